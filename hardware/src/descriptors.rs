//! Descriptors a process keeps while it places others for a child, and
//! the few calls every child's placement shares (a close-on-exec pipe,
//! marking the rest close-on-exec).
//!
//! Between fork and exec a child's descriptors are moved to fixed numbers
//! from 3 (`dup2`), which closes whatever had that number. A descriptor the
//! child still needs after the moves (the jail's `cgroup.procs` files, the
//! pipe its keeper reports on) must therefore never sit at one of those
//! numbers: [`lift`] moves it to [`CHILD_FLOOR`] or above, where no child's
//! numbering reaches.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Children get their descriptors numbered below this.
pub const CHILD_FLOOR: RawFd = 256;

/// `fd`, renumbered at [`CHILD_FLOOR`] or above (close-on-exec).
pub fn lift(fd: OwnedFd) -> std::io::Result<OwnedFd> {
    if fd.as_raw_fd() >= CHILD_FLOOR {
        return Ok(fd);
    }
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor we own returns a new one or -1.
    let lifted = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, CHILD_FLOOR) };
    if lifted < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(lifted) })
}

/// A pipe (read end, write end), close-on-exec.
pub fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut ends = [-1; 2];
    // SAFETY: pipe2(2) into a local array; on success both are ours.
    if unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: two fresh descriptors this process owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1])) })
}

/// In a child between fork and exec (async-signal-safe): marks every
/// descriptor from `first` up close-on-exec, so that nothing the parent
/// itself inherited reaches the program. Closing them here would also
/// close the standard library's exec-error pipe.
pub fn close_on_exec_from(first: RawFd) {
    let first = first.max(0) as libc::c_uint;
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets flags on
    // descriptors from `first` up.
    let marked = unsafe { libc::syscall(libc::SYS_close_range, first, libc::c_uint::MAX, libc::CLOSE_RANGE_CLOEXEC) };
    if marked != 0 {
        // Kernels before 5.11: mark them one by one, up to the limit.
        // SAFETY: sysconf has no preconditions.
        let limit = unsafe { libc::sysconf(libc::_SC_OPEN_MAX) }.clamp(1024, 1 << 20) as RawFd;
        for fd in first as RawFd..limit {
            // SAFETY: F_SETFD on any number; EBADF for unused ones is fine.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lifted_descriptor_is_out_of_every_childs_numbering() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let lifted = lift(OwnedFd::from(file)).unwrap();
        assert!(lifted.as_raw_fd() >= CHILD_FLOOR);
        // SAFETY: F_GETFD on a descriptor we own.
        let flags = unsafe { libc::fcntl(lifted.as_raw_fd(), libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
    }
}
