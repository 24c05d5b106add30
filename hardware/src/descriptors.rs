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
    duplicate_at_or_above(&fd, CHILD_FLOOR)
}

/// A descriptor of its own (close-on-exec) for `fd`, an open descriptor
/// the caller holds (an eventfd to hand a child while keeping it).
pub fn copy(fd: &impl AsRawFd) -> std::io::Result<OwnedFd> {
    duplicate_at_or_above(fd, 3)
}

/// A close-on-exec duplicate of `fd` numbered `floor` or above.
fn duplicate_at_or_above(fd: &impl AsRawFd, floor: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor the caller keeps open
    // returns a new one or -1.
    let duplicate = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, floor) };
    if duplicate < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(duplicate) })
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

/// Sets `O_NONBLOCK` on `fd`'s file description (shared with every copy
/// of it, a child's included).
pub fn set_nonblocking(fd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: fcntl(2) F_GETFL and F_SETFL on a descriptor this process owns.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The descriptors a child gets, at the numbers it expects them at; in the
/// child, [`Placement::install_in_child`] puts them there and marks every
/// other descriptor above standard error close-on-exec. The one placement
/// every child of the reflector gets (driver VMs numbered from 3, QEMU at
/// the numbers its command line names).
#[derive(Debug, Default)]
pub struct Placement {
    /// (source in this process, number in the child).
    placed: Vec<(RawFd, RawFd)>,
    /// Scratch for the child: each source copied above every target first
    /// (so placing one cannot overwrite another still to be placed; a
    /// source may itself be numbered like a target). Allocated here: the
    /// child may not allocate between fork and exec.
    parked: Vec<RawFd>,
}

impl Placement {
    /// Nothing placed yet.
    pub fn new() -> Self {
        Placement::default()
    }

    /// Gives the child `source` as descriptor `target` (3 up to
    /// [`CHILD_FLOOR`]).
    pub fn place(&mut self, source: RawFd, target: RawFd) {
        debug_assert!((3..CHILD_FLOOR).contains(&target), "descriptor {target} outside a child's numbering");
        self.placed.push((source, target));
        self.parked.push(-1);
    }

    /// How many are placed.
    pub fn len(&self) -> usize {
        self.placed.len()
    }

    /// Whether none is placed.
    pub fn is_empty(&self) -> bool {
        self.placed.is_empty()
    }

    /// In the child, between fork and exec (async-signal-safe calls only,
    /// no allocation): marks every descriptor above standard error
    /// close-on-exec, then moves every source to its number (`dup2` clears
    /// the mark on its copy alone). Closing them instead would also close
    /// the standard library's exec-error pipe. Every number the child is
    /// not given is marked, gaps between targets included: a descriptor
    /// the parent inherited without close-on-exec at such a number (QEMU's
    /// targets leave gaps; a directory inherited there would open the
    /// jail's empty root) reached the child when only the numbers above the
    /// highest target were marked (an adversarial review found it).
    pub fn install_in_child(&mut self) -> std::io::Result<()> {
        let above = self.placed.iter().map(|(_, target)| *target).max().unwrap_or(2) + 1;
        for ((source, _), parked) in self.placed.iter().zip(self.parked.iter_mut()) {
            // SAFETY: duplicates a descriptor this process holds, at a free
            // number above every target.
            *parked = unsafe { libc::fcntl(*source, libc::F_DUPFD_CLOEXEC, above) };
            if *parked < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        close_on_exec_from(3);
        for ((_, target), parked) in self.placed.iter().zip(&self.parked) {
            // SAFETY: dup2 onto a number this child owns; the copy is not
            // close-on-exec, so it survives the exec.
            if unsafe { libc::dup2(*parked, *target) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
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

    /// Runs `placement` in a forked child and reports, for `numbers`, the
    /// device and inode behind each and whether it survives an exec.
    fn in_child(mut placement: Placement, numbers: &[RawFd]) -> Vec<Option<(u64, u64, bool)>> {
        let (read, write) = pipe().unwrap();
        // SAFETY: fork in a test; the child only makes system calls on
        // memory allocated before the fork and exits with _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let ok = placement.install_in_child().is_ok();
            let mut out = [0u8; 8 * 3 * 8 + 1];
            out[0] = u8::from(ok);
            for (i, fd) in numbers.iter().enumerate() {
                // SAFETY: an all-zero stat is a valid value of the C struct.
                let mut st: libc::stat = unsafe { std::mem::zeroed() };
                // SAFETY: fstat into a local struct.
                let open = unsafe { libc::fstat(*fd, &mut st) } == 0;
                // SAFETY: F_GETFD on any number only reads flags.
                let cloexec = unsafe { libc::fcntl(*fd, libc::F_GETFD) } & libc::FD_CLOEXEC != 0;
                let at = 1 + i * 24;
                let values = if open { [st.st_dev, st.st_ino, u64::from(!cloexec)] } else { [0, 0, 0] };
                for (j, value) in values.iter().enumerate() {
                    out[at + j * 8..at + j * 8 + 8].copy_from_slice(&value.to_le_bytes());
                }
            }
            // SAFETY: write to the pipe, then _exit without unwinding.
            unsafe {
                libc::write(write.as_raw_fd(), out.as_ptr().cast(), out.len());
                libc::_exit(0);
            }
        }
        drop(write);
        let mut out = vec![0u8; 8 * 3 * 8 + 1];
        std::io::Read::read_exact(&mut std::fs::File::from(read), &mut out).unwrap();
        // SAFETY: reaping our own child.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        assert_eq!(out[0], 1, "the placement failed in the child");
        let word = |at: usize| u64::from_le_bytes(out[at..at + 8].try_into().unwrap());
        (0..numbers.len())
            .map(|i| {
                let at = 1 + i * 24;
                (word(at) != 0 || word(at + 8) != 0).then(|| (word(at), word(at + 8), word(at + 16) == 1))
            })
            .collect()
    }

    fn identity(fd: RawFd) -> (u64, u64) {
        // SAFETY: an all-zero stat is a valid value of the C struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat into a local struct.
        let found = unsafe { libc::fstat(fd, &mut st) };
        assert_eq!(found, 0);
        (st.st_dev, st.st_ino)
    }

    #[test]
    fn placed_descriptors_land_at_their_numbers_even_when_sources_sit_on_targets() {
        // Two files whose own numbers are likely low (3, 4, ...): placed
        // crosswise, each onto the other's number.
        let a = std::fs::File::open("/dev/null").unwrap();
        let b = tempfile_in_tmp();
        let (fa, fb) = (a.as_raw_fd(), b.as_raw_fd());
        let mut placement = Placement::new();
        placement.place(fa, fb);
        placement.place(fb, fa);
        let extra = std::fs::File::open("/dev/zero").unwrap();
        let seen = in_child(placement, &[fb, fa, extra.as_raw_fd()]);
        assert_eq!(seen[0].map(|(d, i, _)| (d, i)), Some(identity(fa)), "a at b's number");
        assert_eq!(seen[1].map(|(d, i, _)| (d, i)), Some(identity(fb)), "b at a's number");
        assert!(seen[0].unwrap().2 && seen[1].unwrap().2, "placed ones survive the exec");
        if extra.as_raw_fd() > fa.max(fb) {
            assert!(!seen[2].unwrap().2, "anything else is close-on-exec");
        }
    }

    /// A descriptor the parent holds without close-on-exec, at a number
    /// between two targets, does not reach the program.
    #[test]
    fn a_descriptor_in_a_gap_between_targets_does_not_survive_the_exec() {
        let inherited = std::fs::File::open("/dev/null").unwrap();
        // SAFETY: F_DUPFD (not close-on-exec) of a descriptor we hold, at
        // 200 or above; checked below.
        let gap = unsafe { libc::fcntl(inherited.as_raw_fd(), libc::F_DUPFD, 200) };
        assert!(gap >= 200);
        // SAFETY: a fresh descriptor owned from here on.
        let _gap = unsafe { OwnedFd::from_raw_fd(gap) };
        let (a, b) = (std::fs::File::open("/dev/zero").unwrap(), tempfile_in_tmp());
        let mut placement = Placement::new();
        placement.place(a.as_raw_fd(), gap - 1);
        placement.place(b.as_raw_fd(), gap + 1);
        let seen = in_child(placement, &[gap - 1, gap, gap + 1]);
        assert!(seen[0].unwrap().2 && seen[2].unwrap().2, "placed ones survive the exec");
        assert!(!seen[1].unwrap().2, "the descriptor between the targets survives the exec");
    }

    fn tempfile_in_tmp() -> std::fs::File {
        let path = std::env::temp_dir().join(format!("placement-{}", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }

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
