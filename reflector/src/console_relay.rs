//! Carries jailed vmms' standard error to the reflector's own when that is
//! a regular file.
//!
//! Why: a jailed vmm may write no regular file at all (its jail sets
//! `RLIMIT_FSIZE` to 0, `jail::child`), so that one taken over before its
//! own filters (by a hostile driver image's ELF, say) cannot grow a
//! memory disk's image, the one window file no seal covers. Inheriting a
//! standard error that is a regular file (a log file) would then kill it
//! at its first log line; such a vmm gets a pipe instead, and one thread
//! here copies what comes through it to the reflector's standard error,
//! whole writes at a time (a vmm writes each line at once, and a pipe
//! keeps writes of up to a page whole), so lines of different driver VMs
//! do not mix. A standard error that is a pipe, a terminal or a socket (a
//! journal) is inherited as before.
//!
//! What it is not: a filter. It is a limit: each driver VM's output may
//! add [`RATE`] bytes a second to the log, in bursts of [`BURST`] (its
//! start, a crash report); what comes beyond is dropped, and a line says
//! how much, so that a hostile vmm cannot fill the host's disk through the
//! reflector's log. A vmm that inherits the reflector's standard error (a
//! pipe, a terminal, a journal) is not limited here: a journal limits it
//! itself.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// What a jailed vmm's standard error should be: a pipe into the relay if
/// the reflector's is a regular file, else the reflector's own.
pub fn stderr_for_jailed_vmm() -> std::io::Result<Stdio> {
    if !stderr_is_regular_file() {
        return Ok(Stdio::inherit());
    }
    let (read, write) = hardware::descriptors::pipe()?;
    relay()
        .map_err(|error| std::io::Error::new(error.kind(), format!("starting the console relay: {error}")))?
        .add(read)?;
    Ok(Stdio::from(write))
}

/// Whether this process's standard error is a regular file (asked once:
/// the reflector never changes it).
fn stderr_is_regular_file() -> bool {
    static REGULAR: OnceLock<bool> = OnceLock::new();
    *REGULAR.get_or_init(|| {
        let mut stat = std::mem::MaybeUninit::<libc::stat>::zeroed();
        // SAFETY: fstat(2) of descriptor 2 into a local struct it fills.
        let known = unsafe { libc::fstat(2, stat.as_mut_ptr()) } == 0;
        // SAFETY: fstat succeeded, so the struct is filled; zeroed otherwise.
        known && unsafe { stat.assume_init() }.st_mode & libc::S_IFMT == libc::S_IFREG
    })
}

/// The relay: its epoll set and the read ends it watches.
struct Relay {
    epoll: Epoll,
    /// Shared with the copy under way, so that `add` (a driver VM's
    /// start) never waits for a copy.
    pipes: Mutex<HashMap<RawFd, Arc<Pipe>>>,
}

/// One driver VM's output: its pipe and what it may still add to the log.
struct Pipe {
    file: File,
    budget: Mutex<Budget>,
}

/// Bytes a second one driver VM's output may add to the log: a driver's
/// console and the vmm's own lines are a few a second.
pub const RATE: u64 = 64 * 1024;

/// Bytes one driver VM's output may add at once above [`RATE`].
pub const BURST: u64 = 1 << 20;

/// What one driver VM's output may still add to the log (a token bucket),
/// and what it lost since it last could.
struct Budget {
    bytes: u64,
    last: std::time::Instant,
    dropped: u64,
}

impl Budget {
    fn new() -> Self {
        Budget { bytes: BURST, last: std::time::Instant::now(), dropped: 0 }
    }

    /// Whether `len` more bytes may go to the log now (taken if so).
    fn take(&mut self, len: usize) -> bool {
        let now = std::time::Instant::now();
        let earned = now.saturating_duration_since(self.last).as_micros() as u64 * RATE / 1_000_000;
        if earned > 0 {
            self.last = now;
        }
        self.bytes = self.bytes.saturating_add(earned).min(BURST);
        match self.bytes.checked_sub(len as u64) {
            Some(left) => {
                self.bytes = left;
                true
            }
            None => {
                self.dropped += len as u64;
                false
            }
        }
    }
}

/// The relay, its thread started at the first call.
fn relay() -> std::io::Result<Arc<Relay>> {
    static RELAY: Mutex<Option<Arc<Relay>>> = Mutex::new(None);
    let mut started = RELAY.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(relay) = &*started {
        return Ok(relay.clone());
    }
    let relay = Arc::new(Relay { epoll: Epoll::new()?, pipes: Mutex::default() });
    let running = relay.clone();
    std::thread::Builder::new().name("console-relay".into()).spawn(move || running.run())?;
    *started = Some(relay.clone());
    Ok(relay)
}

impl Relay {
    fn pipes(&self) -> std::sync::MutexGuard<'_, HashMap<RawFd, Arc<Pipe>>> {
        self.pipes.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Watches `read` until its writers are gone.
    fn add(&self, read: OwnedFd) -> std::io::Result<()> {
        let fd = read.as_raw_fd();
        // SAFETY: fcntl(2) on a descriptor we own: a read never blocks the
        // relay's other pipes.
        if unsafe { libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        self.pipes().insert(fd, Arc::new(Pipe { file: File::from(read), budget: Mutex::new(Budget::new()) }));
        let event = EpollEvent::new(EventSet::IN, fd as u64);
        self.epoll.ctl(ControlOperation::Add, fd, event).inspect_err(|_| {
            self.pipes().remove(&fd);
        })
    }

    fn run(&self) {
        let mut events = vec![EpollEvent::default(); 32];
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let ready = match self.epoll.wait(-1, &mut events) {
                Ok(ready) => ready,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    tracing::error!(%error, "the console relay cannot wait for driver VMs' output; it stops");
                    return;
                }
            };
            for event in &events[..ready] {
                let fd = event.data() as RawFd;
                let pipe = self.pipes().get(&fd).cloned();
                if !pipe.is_some_and(|pipe| copy(&pipe, &mut buffer, &mut std::io::stderr().lock())) {
                    let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
                    self.pipes().remove(&fd);
                }
            }
        }
    }
}

/// Reads of one pipe per turn at most: a vmm that writes without pause
/// cannot keep the relay from the others (epoll reports it again).
const READS_PER_TURN: usize = 16;

/// Copies what `pipe` holds now (at most [`READS_PER_TURN`] reads) to
/// `log` (standard error) within its budget; false once its writers are
/// gone (or it failed).
fn copy(pipe: &Pipe, buffer: &mut [u8], log: &mut impl Write) -> bool {
    let mut budget = pipe.budget.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    for _ in 0..READS_PER_TURN {
        match (&pipe.file).read(buffer) {
            Ok(0) => return false,
            Ok(read) => {
                let dropped = budget.dropped;
                if budget.take(read) {
                    if dropped > 0 {
                        budget.dropped = 0;
                        let _ = writeln!(
                            log,
                            "reflector: {dropped} bytes of a driver VM's output dropped (over {} KiB a second)",
                            RATE / 1024
                        );
                    }
                    // Standard error is a regular file: the write does not
                    // block, and one that fails loses only this output.
                    let _ = log.write_all(&buffer[..read]);
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vmm writing without pause adds its burst and its rate to the
    /// log, not all it writes, and the log says how much it lost.
    #[test]
    fn a_flooding_vmm_adds_at_most_its_budget_to_the_log() {
        let (read, write) = hardware::descriptors::pipe().unwrap();
        // SAFETY: fcntl(2) on a descriptor this test owns.
        assert_eq!(unsafe { libc::fcntl(read.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) }, 0);
        let pipe = Pipe { file: File::from(read), budget: Mutex::new(Budget::new()) };
        let started = std::time::Instant::now();
        let flood = std::thread::spawn(move || {
            let mut write = File::from(write);
            let line = [b'x'; 4096];
            for _ in 0..(8 * BURST / 4096) {
                write.write_all(&line).unwrap();
            }
        });
        let (mut buffer, mut log) = (vec![0u8; 64 * 1024], Vec::new());
        while copy(&pipe, &mut buffer, &mut log) {
            std::thread::yield_now();
        }
        flood.join().unwrap();
        let allowed = BURST + started.elapsed().as_micros() as u64 * RATE / 1_000_000 + 64 * 1024;
        let logged = log.iter().filter(|&&byte| byte == b'x').count() as u64;
        assert!(logged <= allowed, "{logged} bytes logged of {}, {allowed} allowed", 8 * BURST);
        assert!(logged >= BURST / 2, "the burst itself was not logged: {logged} bytes");
        let budget = pipe.budget.lock().unwrap();
        let noted = String::from_utf8_lossy(&log).lines().filter(|line| line.contains("output dropped")).count();
        assert!(budget.dropped > 0 || noted > 0, "nothing said of what was dropped");
    }
}
