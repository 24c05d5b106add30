//! Carries jailed vmms' standard error to the reflector's own, each driver
//! VM's within a budget.
//!
//! Why a pipe: a jailed vmm may write no regular file at all (its jail
//! sets `RLIMIT_FSIZE` to 0, `jail::child`), so that one taken over before
//! its own filters (by a hostile driver image's ELF, say) cannot grow a
//! memory disk's image, the one window file no seal covers. Inheriting a
//! standard error that is a regular file (a log file) would then kill it
//! at its first log line.
//!
//! Why a budget: the reflector's log is every device's. A vmm that
//! inherited it (a pipe, a terminal, a journal's socket) could write
//! without pause, and a journal then rate-limits the reflector's whole
//! service, dropping other devices' lines with the flood; a log file would
//! fill the host's disk. So every jailed vmm gets a pipe, and one thread
//! here copies what comes through it to the reflector's standard error,
//! whole writes at a time (a vmm writes each line at once, and a pipe
//! keeps writes of up to a page whole), so lines of different driver VMs
//! do not mix. Each driver VM's output may add [`RATE`] bytes a second to
//! the log, in bursts of [`BURST`] (its start, a crash report); what comes
//! beyond is dropped, and a line says how much.
//!
//! What it is not: a filter, nor a guard against a log that does not take
//! what it is given. A standard error that blocks (a pipe nobody reads)
//! holds this thread, and then each vmm at its next line once its pipe is
//! full, as it would hold them had they inherited it. Unjailed vmms
//! (`--no-jail`, which trusts its drivers) inherit the reflector's.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// A jailed vmm's standard error: a pipe into the relay.
pub fn stderr_for_jailed_vmm() -> std::io::Result<Stdio> {
    let (read, write) = hardware::descriptors::pipe()?;
    relay()
        .map_err(|error| std::io::Error::new(error.kind(), format!("starting the console relay: {error}")))?
        .add(read)?;
    Ok(Stdio::from(write))
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
/// gone (or it failed), having said what it dropped since it last could.
fn copy(pipe: &Pipe, buffer: &mut [u8], log: &mut impl Write) -> bool {
    let mut budget = pipe.budget.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    for _ in 0..READS_PER_TURN {
        match (&pipe.file).read(buffer) {
            Ok(read) if read > 0 => {
                let dropped = budget.dropped;
                if budget.take(read) {
                    note_dropped(&mut budget, dropped, log);
                    // One that fails (a reader gone) loses only this output.
                    let _ = log.write_all(&buffer[..read]);
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            _ => {
                // The end of its output (a flood is often a driver VM's
                // last act): what it lost is said now or never.
                let dropped = budget.dropped;
                note_dropped(&mut budget, dropped, log);
                return false;
            }
        }
    }
    true
}

/// Says in the log that `dropped` bytes of a driver VM's output were lost.
fn note_dropped(budget: &mut Budget, dropped: u64, log: &mut impl Write) {
    if dropped > 0 {
        budget.dropped = 0;
        let _ = writeln!(
            log,
            "reflector: {dropped} bytes of a driver VM's output dropped (over {} KiB a second)",
            RATE / 1024
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vmm writing without pause adds its burst and its rate to the
    /// log, not all it writes, and the log says how much it lost, up to
    /// its last byte.
    #[test]
    fn a_flooding_vmm_adds_at_most_its_budget_to_the_log() {
        let (read, write) = hardware::descriptors::pipe().unwrap();
        // SAFETY: fcntl(2) on a descriptor this test owns.
        assert_eq!(unsafe { libc::fcntl(read.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) }, 0);
        let pipe = Pipe { file: File::from(read), budget: Mutex::new(Budget::new()) };
        let started = std::time::Instant::now();
        let flood = std::thread::spawn(move || {
            let mut write = File::from(write);
            let mut line = [b'x'; 4096];
            line[4095] = b'\n';
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
        let text = String::from_utf8_lossy(&log);
        let flood = |line: &&str| line.bytes().all(|byte| byte == b'x');
        let logged = text.lines().filter(flood).map(|line| line.len() as u64 + 1).sum::<u64>();
        assert!(logged <= allowed, "{logged} bytes logged of {}, {allowed} allowed", 8 * BURST);
        assert!(logged >= BURST / 2, "the burst itself was not logged: {logged} bytes");
        // Every byte is either in the log or said to be dropped, the last
        // drops too, though no output followed them.
        let noted: u64 = text
            .lines()
            .filter_map(|line| line.strip_prefix("reflector: ")?.split(" bytes of a driver VM's output dropped").next())
            .map(|count| count.parse::<u64>().unwrap())
            .sum();
        assert_eq!(logged + noted, 8 * BURST, "{logged} bytes logged and {noted} said to be dropped");
    }
}
