//! Eventfds shared with a process the reflector does not trust: a vhost-user
//! client's kick and call, and a driver VM's doorbells, interrupt lines and
//! start signal, which its vmm holds.
//!
//! The other holder shares the *file description*: it can clear the
//! `O_NONBLOCK` the reflector set, drain the count between the reflector's
//! wake-up and its read, or fill it to the most a write may leave. A plain
//! `read(2)` or `write(2)` of such a descriptor can then sleep for as long as
//! that process likes, on whichever reflector thread made it (another
//! tenant's card delivering a frame, a device's worker with its device
//! held). So neither is ever a plain read or write:
//!
//! - [`take`] reads the count with `preadv2(RWF_NOWAIT)`, which never
//!   sleeps whatever the description's flags (eventfds take it since Linux
//!   5.12): a drained eventfd is a spurious wake-up, nothing more;
//! - [`signal`] adds 1 through the kernel's own eventfd signal, which never
//!   sleeps either (it saturates at the count's most): the completion of an
//!   AIO poll of an always-ready eventfd of this process's own, submitted
//!   with `IOCB_FLAG_RESFD` naming the target, on one AIO context made
//!   before anything is served ([`prepare`]).
//!
//! An eventfd the reflector makes and hands to a vmm (a doorbell, an
//! interrupt line, a start signal) is a [`SharedEventFd`], which has no
//! other read or write than these two: a plain one cannot be written by
//! mistake. A client's kick and call come from the vhost-user library as
//! its own type, so they go through the two functions by descriptor.
//!
//! It is not an event loop: callers poll the descriptors as before.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;

/// An eventfd the reflector shares with a process it does not trust (a
/// vmm): counted only by [`SharedEventFd::take`] and raised only by
/// [`SharedEventFd::signal`], neither of which ever waits, whatever the
/// other holder does to the descriptor. Polled through its descriptor,
/// and handed to a child as a copy of it.
#[derive(Debug)]
pub struct SharedEventFd(OwnedFd);

impl SharedEventFd {
    /// A new eventfd, its count 0, non-blocking and close-on-exec.
    pub fn new() -> io::Result<SharedEventFd> {
        // SAFETY: eventfd(2); checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor owned from here on.
        Ok(SharedEventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Adds 1 to the count without ever waiting ([`signal`]).
    pub fn signal(&self) -> io::Result<()> {
        signal(self.0.as_raw_fd())
    }

    /// Takes the count, 0 at once if it has none ([`take`]).
    pub fn take(&self) -> io::Result<u64> {
        take(self.0.as_raw_fd())
    }

    /// Another descriptor of the same eventfd (close-on-exec).
    pub fn try_clone(&self) -> io::Result<SharedEventFd> {
        self.0.try_clone().map(SharedEventFd)
    }
}

impl AsRawFd for SharedEventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl AsFd for SharedEventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// Takes the eventfd's count: 0 at once if it has none, whatever the other
/// holder did to the descriptor's flags.
pub fn take(eventfd: RawFd) -> io::Result<u64> {
    let kick = eventfd;
    let mut count = 0u64;
    let Err(error) = read_without_waiting(kick, &mut count) else { return Ok(count) };
    match error.raw_os_error() {
        Some(libc::EAGAIN) => Ok(0),
        // A kernel before 5.12, whose eventfds refuse RWF_NOWAIT: read only
        // what poll finds (the other holder can still drain it in between
        // there).
        Some(libc::EOPNOTSUPP) => {
            let mut poll = libc::pollfd { fd: kick, events: libc::POLLIN, revents: 0 };
            // SAFETY: poll(2) on one pollfd on the stack, without waiting.
            if unsafe { libc::poll(&mut poll, 1, 0) } == 1 && poll.revents & libc::POLLIN != 0 {
                // SAFETY: read(2) into the 8 bytes of `count`.
                if unsafe { libc::read(kick, (&raw mut count).cast(), 8) } < 0 {
                    let error = io::Error::last_os_error();
                    // Drained meanwhile, the descriptor non-blocking.
                    if error.kind() != io::ErrorKind::WouldBlock {
                        return Err(error);
                    }
                    return Ok(0);
                }
                return Ok(count);
            }
            Ok(0)
        }
        _ => Err(error),
    }
}

/// Adds 1 to the eventfd without ever waiting, however full its count and
/// whatever its flags: the kernel adds it, as it completes an AIO poll of
/// an always-ready eventfd of this process's own (`IOCB_FLAG_RESFD`); its
/// signal saturates instead of waiting. Never a write(2), not even as a
/// fallback: the other holder could force one (by using up the host's
/// `fs.aio-max-nr` first) and then block it.
pub fn signal(eventfd: RawFd) -> io::Result<()> {
    match notifier() {
        Ok(notifier) => notifier.notify(eventfd),
        Err(why) => Err(io::Error::other(format!("no AIO context for eventfd signals: {why}"))),
    }
}

/// Makes the signalling context now, so that a failure fails the start
/// (the reflector calls this before it serves a client or starts a driver
/// VM) instead of every signal later, and no client or driver can make it
/// fail by using up the host's AIO contexts first.
pub fn prepare() -> io::Result<()> {
    if !takes_without_waiting() {
        tracing::warn!(
            "this kernel's eventfds refuse RWF_NOWAIT (Linux before 5.12): an eventfd a client or a vmm drains \
             between the reflector's poll and its read can hold a reflector thread until it is written again; \
             run on Linux 5.12 or later"
        );
    }
    notifier().map(|_| ()).map_err(|why| {
        io::Error::other(format!(
            "cannot create the AIO context eventfd signals go through ({why}): is fs.aio-max-nr reached? \
             (sysctl fs.aio-nr fs.aio-max-nr)"
        ))
    })
}

/// Whether a read of `eventfd` takes its whole count, as a kick's must, on
/// any kernel. An eventfd in semaphore mode gives 1 a read and stays
/// readable: a worker woken by one with a large count is woken again for
/// ever, a reflector core the client pays nothing for. Linux 6.7 and later
/// say which eventfds are (`eventfd-semaphore:` in `/proc/self/fdinfo`,
/// the vhost-user check, `third_party/vhost`), older kernels do not, and a
/// review found the refusal promised for every kernel. So: add 2 without
/// waiting ([`signal`]) and take the count ([`take`]). A plain eventfd
/// gives at least 2 (what it held, and whatever its writer added), a
/// semaphore exactly 1; and 0 means the other holder read it in between,
/// which no frontend does with a kick it handed over: false too. What the
/// read took from a plain one (a frontend's first kick, say) is given back
/// as one kick.
pub fn reads_whole_count(eventfd: RawFd) -> io::Result<bool> {
    signal(eventfd)?;
    signal(eventfd)?;
    let whole = take(eventfd)? >= 2;
    if whole {
        signal(eventfd)?;
    }
    Ok(whole)
}

/// Whether this kernel's eventfds take `preadv2(RWF_NOWAIT)` (Linux 5.12):
/// else [`take`] falls back to a poll and a read, between which the other
/// holder can drain the eventfd.
pub fn takes_without_waiting() -> bool {
    let Ok(probe) = SharedEventFd::new() else { return false };
    match read_without_waiting(probe.as_raw_fd(), &mut 0) {
        Ok(()) => true,
        Err(error) => error.raw_os_error() != Some(libc::EOPNOTSUPP),
    }
}

/// `preadv2(RWF_NOWAIT)` of an eventfd's count into `count`.
fn read_without_waiting(eventfd: RawFd, count: &mut u64) -> io::Result<()> {
    let iov = libc::iovec { iov_base: std::ptr::from_mut(count).cast(), iov_len: std::mem::size_of::<u64>() };
    // SAFETY: preadv2(2) into the 8 bytes of `count`, which outlive the
    // call; offset -1 is the descriptor's position (an eventfd has none).
    if unsafe { libc::preadv2(eventfd, &iov, 1, -1, libc::RWF_NOWAIT) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The process's signalling context: one, shared by every thread
/// (io_submit and io_getevents may run concurrently on one context).
fn notifier() -> Result<&'static Notifier, &'static str> {
    static NOTIFIER: OnceLock<Result<Notifier, String>> = OnceLock::new();
    NOTIFIER.get_or_init(|| Notifier::new().map_err(|error| error.to_string())).as_ref().map_err(String::as_str)
}

/// `struct iocb` of `<linux/aio_abi.h>` (little-endian x86_64).
#[repr(C)]
#[derive(Default)]
struct Iocb {
    data: u64,
    key: u32,
    rw_flags: i32,
    opcode: u16,
    reqprio: i16,
    fildes: u32,
    buf: u64,
    nbytes: u64,
    offset: i64,
    reserved2: u64,
    flags: u32,
    resfd: u32,
}

/// `struct io_event` of `<linux/aio_abi.h>`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct IoEvent {
    data: u64,
    obj: u64,
    res: i64,
    res2: i64,
}

const IOCB_CMD_POLL: u16 = 5;
const IOCB_FLAG_RESFD: u32 = 1;
/// Completions the context holds before they must be reaped: each signal
/// completes at once, so this only spaces the reaps (one io_getevents per
/// this many signals, of every device).
const AIO_EVENTS: usize = 256;
/// Submissions tried before a signal is given up: each failed one
/// reaps the context first, so only other threads' notifications filling
/// it again in between make a second one fail.
const SUBMIT_TRIES: usize = 4;

/// The notification context and the eventfd its polls find ready.
struct Notifier {
    context: libc::c_ulong,
    always_ready: OwnedFd,
}

impl Notifier {
    fn new() -> io::Result<Notifier> {
        // SAFETY: eventfd(2) with a count of 1 that nothing ever reads.
        let fd = unsafe { libc::eventfd(1, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor this owns from here on.
        let always_ready = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut context: libc::c_ulong = 0;
        // SAFETY: io_setup(2) writing the new context's id into `context`.
        if unsafe { libc::syscall(libc::SYS_io_setup, AIO_EVENTS as libc::c_long, &raw mut context) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Notifier { context, always_ready })
    }

    fn notify(&self, call: RawFd) -> io::Result<()> {
        let mut iocb = Iocb {
            opcode: IOCB_CMD_POLL,
            fildes: self.always_ready.as_raw_fd() as u32,
            buf: libc::POLLIN as u64,
            flags: IOCB_FLAG_RESFD,
            resfd: call as u32,
            ..Iocb::default()
        };
        let mut iocbs = [&raw mut iocb];
        for _ in 0..SUBMIT_TRIES {
            // SAFETY: io_submit(2) of one iocb on the stack, which the kernel
            // copies in before returning (a poll of a ready descriptor also
            // completes before it returns).
            let submitted =
                unsafe { libc::syscall(libc::SYS_io_submit, self.context, 1 as libc::c_long, iocbs.as_mut_ptr()) };
            if submitted == 1 {
                return Ok(());
            }
            let error = io::Error::last_os_error();
            if error.raw_os_error() != Some(libc::EAGAIN) {
                return Err(error);
            }
            // The context holds its most completions: reap them, try again.
            self.reap();
        }
        Err(io::Error::other("the AIO context stayed full after its completions were reaped"))
    }

    /// Takes the completions the context holds, without waiting.
    fn reap(&self) {
        let mut events = [IoEvent::default(); AIO_EVENTS];
        let zero = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: io_getevents(2) into `events`, AIO_EVENTS long, not waiting.
        unsafe {
            libc::syscall(
                libc::SYS_io_getevents,
                self.context,
                0 as libc::c_long,
                AIO_EVENTS as libc::c_long,
                events.as_mut_ptr(),
                &raw const zero,
            )
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn eventfd(count: u32, flags: libc::c_int) -> OwnedFd {
        // SAFETY: eventfd(2); checked below.
        let fd = unsafe { libc::eventfd(count, libc::EFD_CLOEXEC | flags) };
        assert!(fd >= 0, "eventfd: {}", io::Error::last_os_error());
        // SAFETY: a fresh descriptor this owns from here on.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    fn count(fd: &OwnedFd) -> u64 {
        let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).unwrap();
        let line = fdinfo.lines().find_map(|l| l.strip_prefix("eventfd-count:")).unwrap();
        u64::from_str_radix(line.trim(), 16).unwrap()
    }

    /// Runs `f` on a thread; whether it returned within 5 s (a thread that
    /// sleeps for good is left behind: the test has failed).
    fn returns(f: impl FnOnce() + Send + 'static) -> bool {
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            f();
            let _ = done.send(());
        });
        finished.recv_timeout(Duration::from_secs(5)).is_ok()
    }

    /// An eventfd made blocking and full by its other holder (its count at
    /// the most a write may leave) still gets its signal, and the signaller
    /// does not wait: a write would have to, or skip it.
    #[test]
    fn a_signal_to_a_full_blocking_eventfd_never_waits_and_is_not_lost() {
        let target = eventfd(0, 0);
        let most = u64::MAX - 1;
        // SAFETY: write(2) of 8 bytes from a local.
        assert_eq!(unsafe { libc::write(target.as_raw_fd(), (&raw const most).cast(), 8) }, 8);
        let raw = target.as_raw_fd();
        assert!(returns(move || signal(raw).unwrap()), "the signal waited on a full eventfd");
        assert_eq!(count(&target), u64::MAX, "the signal was not added");
        let emptied = eventfd(0, 0);
        signal(emptied.as_raw_fd()).unwrap();
        signal(emptied.as_raw_fd()).unwrap();
        assert_eq!(count(&emptied), 2);
    }

    /// Many signals from one thread: its AIO context's completions are
    /// reaped as it fills.
    #[test]
    fn signals_outnumbering_the_aio_context_all_arrive() {
        let target = eventfd(0, libc::EFD_NONBLOCK);
        for _ in 0..AIO_EVENTS * 5 {
            signal(target.as_raw_fd()).unwrap();
        }
        assert_eq!(count(&target), (AIO_EVENTS * 5) as u64);
    }

    /// This kernel takes RWF_NOWAIT on eventfds (the machines the tests
    /// run on are 5.12 or later; older ones are warned about at start).
    #[test]
    fn this_kernel_takes_eventfds_without_waiting() {
        assert!(takes_without_waiting());
    }

    /// A semaphore eventfd is told from a plain one by reading, not by
    /// what the kernel says of it (Linux 6.7 and later only), and a plain
    /// one keeps a kick: whatever it held before is not lost.
    #[test]
    fn an_eventfd_in_semaphore_mode_is_told_by_reading_it() {
        for held in [0, 1, 5, u64::MAX - 2] {
            let semaphore = eventfd(0, libc::EFD_NONBLOCK | libc::EFD_SEMAPHORE);
            let plain = eventfd(0, libc::EFD_NONBLOCK);
            for target in [&semaphore, &plain] {
                if held > 0 {
                    // SAFETY: write(2) of the 8 bytes of a local.
                    assert_eq!(unsafe { libc::write(target.as_raw_fd(), (&raw const held).cast(), 8) }, 8);
                }
            }
            assert!(!reads_whole_count(semaphore.as_raw_fd()).unwrap(), "a semaphore holding {held} passed");
            assert!(reads_whole_count(plain.as_raw_fd()).unwrap(), "a plain eventfd holding {held} was refused");
            assert_eq!(take(plain.as_raw_fd()).unwrap(), 1, "holding {held}: the kick given back");
        }
        // Not an eventfd at all: an error, never a pass.
        let mut pipe = [0; 2];
        // SAFETY: pipe2(2) into a local array; both ends closed below.
        assert_eq!(unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) }, 0);
        assert!(!reads_whole_count(pipe[0]).unwrap_or(false));
        // SAFETY: closing the two ends made above.
        unsafe {
            libc::close(pipe[0]);
            libc::close(pipe[1]);
        }
    }

    /// An eventfd its other holder made blocking and drained gives 0 at
    /// once; one with a count gives the count and is left at 0.
    #[test]
    fn taking_a_drained_blocking_eventfd_does_not_wait() {
        let drained = eventfd(0, 0);
        let raw = drained.as_raw_fd();
        assert!(returns(move || assert_eq!(take(raw).unwrap(), 0)), "the take waited on a drained eventfd");
        let counted = eventfd(3, 0);
        assert_eq!(take(counted.as_raw_fd()).unwrap(), 3);
        assert_eq!(count(&counted), 0);
    }
}
