//! `hostile-qemu`: stands in for a QEMU device model that a hostile driver
//! took over. The reflector starts it exactly as it starts QEMU (`qemu=`),
//! jail included; it ignores its arguments, tries to set up an io_uring
//! (whose submissions no seccomp filter sees), says on its standard error
//! how that ended (the reflector reports what its QEMU said when it fails
//! to start) and exits.
//!
//! Not a test by itself: `reflector/tests/nvme.rs` runs it and judges what
//! it said. Never installed anywhere a real deployment would use it.

fn main() {
    // struct io_uring_params: 120 bytes, zero but for what the kernel fills in.
    let mut params = [0u8; 120];
    // SAFETY: io_uring_setup(2) with a writable params buffer of its size;
    // a ring it made is released at the exit below.
    let ring = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
    let outcome = if ring >= 0 {
        "ok".to_owned()
    } else {
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EPERM) => "EPERM".to_owned(),
            Some(errno) => format!("errno {errno}"),
            None => "failed".to_owned(),
        }
    };
    eprintln!("hostile-qemu: io_uring_setup {outcome}");
    std::process::exit(1);
}
