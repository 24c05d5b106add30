//! Descriptors a process keeps while it places others for a child.
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
