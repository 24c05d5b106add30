//! `hostile-qemu`: stands in for a QEMU device model that a hostile driver
//! took over. The reflector starts it exactly as it starts QEMU (`qemu=`),
//! jail included; it ignores its arguments, tries to set up an io_uring
//! (whose submissions no seccomp filter sees) and to grow each regular
//! file it holds (its disk image above all: the host's filesystem is not
//! its to fill), says on its standard error how that ended (the reflector
//! reports what its QEMU said when it fails to start) and exits.
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
    // A write past its file size limit fails instead of killing it.
    // SAFETY: signal(2) setting a disposition to ignore, no handler.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    for fd in 3..64 {
        if let Some(outcomes) = grow(fd) {
            eprintln!("hostile-qemu: grow fd {fd}: {}", outcomes.join(","));
        }
    }
    std::process::exit(1);
}

/// Tries to grow `fd`, if it is a regular file, past its end: a write, an
/// allocation that changes the size, one that keeps it (blocks past the
/// end), and a truncation upwards; how each ended.
fn grow(fd: i32) -> Option<Vec<String>> {
    // SAFETY: fstat(2) into a local struct, then pwrite(2) of one local
    // byte, fallocate(2) and ftruncate(2) on a descriptor this process
    // holds: what a compromised QEMU would try.
    unsafe {
        let mut stat: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut stat) < 0 || stat.st_mode & libc::S_IFMT != libc::S_IFREG {
            return None;
        }
        let end = stat.st_size;
        let said = |result: libc::c_long| {
            if result >= 0 {
                "ok".to_owned()
            } else {
                format!("errno {}", std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
            }
        };
        Some(vec![
            said(libc::pwrite(fd, [0u8].as_ptr().cast(), 1, end + (1 << 20)) as libc::c_long),
            said(libc::fallocate(fd, 0, end, 1 << 20).into()),
            said(libc::fallocate(fd, libc::FALLOC_FL_KEEP_SIZE, end, 1 << 20).into()),
            said(libc::ftruncate(fd, end + (1 << 20)).into()),
        ])
    }
}
