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
    // The reflector's own probe: io_uring_setup(2) for a ring of one entry.
    let outcome = match reflector::jail::io_uring_refused().map(|error| error.raw_os_error()) {
        None => "ok".to_owned(),
        Some(Some(libc::EPERM)) => "EPERM".to_owned(),
        Some(Some(errno)) => format!("errno {errno}"),
        Some(None) => "failed".to_owned(),
    };
    eprintln!("hostile-qemu: io_uring_setup {outcome}");
    std::process::exit(1);
}
