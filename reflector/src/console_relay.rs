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
//! whole lines only (a read may end anywhere in one: the start waits for
//! its end), each starting with the driver VM's name as the reflector
//! knows it and its unprintable characters escaped, so lines of different
//! driver VMs do not mix and none passes for another's. Each device's
//! driver VMs together (one after another, and a spare) may add [`RATE`]
//! bytes a second to the log, in bursts of [`BURST`] (a start, a crash
//! report): a budget per driver VM gave a driver that crashed at its
//! start a fresh burst at each restart. All devices' together may add
//! [`ALL_RATE`], in bursts of [`ALL_BURST`]: a journal limits the whole
//! service, the reflector's own lines included. A line
//! costing [`LINE_COST`] at least (a journal counts lines); what comes
//! beyond is dropped, and a line says how much. The relay reads each pipe
//! at most [`READ_RATE`] a second, and leaves it meanwhile, so that a vmm
//! writing without pause waits on its full pipe, in its own CPU quota,
//! instead of costing the relay a core.
//!
//! What it is not: a filter of what a line says, nor a guard against a log that does not take
//! what it is given. A standard error that blocks (a pipe nobody reads)
//! holds this thread, and then each vmm at its next line once its pipe is
//! full, as it would hold them had they inherited it. Unjailed vmms
//! (`--no-jail`, which trusts its drivers) inherit the reflector's.

use crate::token_bucket::TokenBucket;
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// A jailed vmm's standard error, driver VM `name`'s: a pipe into the
/// relay.
pub fn stderr_for_jailed_vmm(name: &str) -> std::io::Result<Stdio> {
    let (read, write) = hardware::descriptors::pipe()?;
    relay()
        .map_err(|error| std::io::Error::new(error.kind(), format!("starting the console relay: {error}")))?
        .add(read, name)?;
    Ok(Stdio::from(write))
}

/// The relay: its epoll set, the read ends it watches, and the log
/// budgets.
struct Relay {
    epoll: Epoll,
    /// Shared with the copy under way, so that `add` (a driver VM's
    /// start) never waits for a copy.
    pipes: Mutex<HashMap<RawFd, Arc<Pipe>>>,
    /// What each device's driver VMs may still add to the log, by the
    /// name they share: one entry a device, kept while the reflector runs.
    logs: Mutex<HashMap<String, LogBudget>>,
    /// What all devices' driver VMs together may still add ([`ALL_RATE`],
    /// [`ALL_BURST`]).
    all: Arc<Mutex<TokenBucket>>,
}

/// What one device's driver VMs may still add to the log ([`RATE`],
/// [`BURST`]), shared by their pipes, and what all devices' may together.
type LogBudget = Arc<LogShare>;

/// A device's share of the log, and the whole it is a share of: a line is
/// logged only if both have its cost.
struct LogShare {
    device: Mutex<TokenBucket>,
    all: Arc<Mutex<TokenBucket>>,
}

impl LogShare {
    /// Both buckets, held for one read's lines.
    fn lock(&self) -> Spending<'_> {
        Spending {
            device: self.device.lock().unwrap_or_else(|poisoned| poisoned.into_inner()),
            all: self.all.lock().unwrap_or_else(|poisoned| poisoned.into_inner()),
        }
    }
}

/// A device's budget and the whole's, held.
struct Spending<'a> {
    device: std::sync::MutexGuard<'a, TokenBucket>,
    all: std::sync::MutexGuard<'a, TokenBucket>,
}

impl Spending<'_> {
    /// What a line may cost now.
    fn tokens(&mut self) -> u64 {
        self.device.tokens().min(self.all.tokens())
    }

    fn spend(&mut self, n: u64) {
        self.device.spend(n);
        self.all.spend(n);
    }

    /// Spends `n` if both have it; whether they did.
    fn charge(&mut self, n: u64) -> bool {
        let fits = self.tokens() >= n;
        if fits {
            self.spend(n);
        }
        fits
    }

    /// Spends `n` of the device's own (not the whole's: one device's lines
    /// never take the others').
    fn spend_device(&mut self, n: u64) {
        self.device.spend(n);
    }
}

/// A device's budget, a share of `all`.
fn log_budget(all: &Arc<Mutex<TokenBucket>>) -> LogBudget {
    Arc::new(LogShare { device: Mutex::new(TokenBucket::full(RATE, BURST)), all: all.clone() })
}

/// What all devices' driver VMs may add together.
fn all_budget() -> Arc<Mutex<TokenBucket>> {
    Arc::new(Mutex::new(TokenBucket::full(ALL_RATE, ALL_BURST)))
}

/// One driver VM's output: its pipe, whose it is, and what it may still
/// add to the log.
struct Pipe {
    file: File,
    /// The driver VM's name: every line it adds to the log starts with it
    /// in brackets, whatever it wrote.
    name: String,
    budget: Mutex<Budget>,
}

impl Pipe {
    fn new(file: File, name: &str, log: LogBudget) -> Pipe {
        Pipe { file, name: name.to_owned(), budget: Mutex::new(Budget::new(log)) }
    }
}

/// Bytes a second one device's driver VMs may add to the log: a driver's
/// console and the vmm's own lines are a few a second (a start prints two,
/// a crash report about forty). 64 lines a second at [`LINE_COST`].
pub const RATE: u64 = 16 * 1024;

/// Bytes one device's driver VMs may add at once above [`RATE`]: 1,024
/// lines at [`LINE_COST`].
pub const BURST: u64 = 256 * 1024;

/// Bytes a second all devices' driver VMs together may add. A journal
/// limits the reflector's whole service by lines (10,000 per 30 s by
/// default), its own lines (faults, restarts) included, and one device's
/// budget alone used to pass that (64 KiB a second and a 1 MiB burst:
/// 11,776 lines in 30 s, a review found), as did any few devices' together.
/// Now at most 2,880 lines in 30 s after a burst of 2,048 ([`ALL_BURST`]):
/// half the journal's limit at most is the drivers', and a device may take
/// at most two thirds of it.
pub const ALL_RATE: u64 = 24 * 1024;

/// Bytes all devices' driver VMs together may add at once above
/// [`ALL_RATE`].
pub const ALL_BURST: u64 = 512 * 1024;

/// What a line costs of the log's budget at least, whatever its length: a
/// journal limits a service by lines (10,000 per 30 s by default), and a
/// driver printing empty lines had 70,000 of them in its burst alone (a
/// review found it).
pub const LINE_COST: u64 = 256;

/// Bytes a second the relay reads of one driver VM's output, logged or
/// dropped: past that it stops reading the pipe until the time has come,
/// and the vmm waits on its full pipe, in its own CPU quota. Reading and
/// dropping all that a vmm can write cost the relay a core.
pub const READ_RATE: u64 = 16 << 20;

/// What the relay reads at once: a pipe's worth.
const CHUNK: usize = 64 * 1024;

/// The longest line the relay passes on: a longer one is cut there, and
/// the rest of it, up to its end, dropped (a vmm's own lines are at most
/// 4 KiB of a guest's console, escaped).
const MAX_LINE: usize = 32 * 1024;

/// What one driver VM's output may still add to the log (its device's
/// budget), what the relay may still read of it, what it lost since it
/// last could say so, and the line it has begun and not ended.
struct Budget {
    log: LogBudget,
    reads: TokenBucket,
    dropped: u64,
    /// The start of a line a read ended in the middle of: a vmm's write
    /// is not whole in a pipe past a page, nor when the pipe was full, so
    /// a read may end anywhere. Passed on only with its end, so that
    /// another driver VM's line never follows it on the same log line, and
    /// the rest of it never starts one.
    unfinished: Vec<u8>,
    /// The line under way was cut at [`MAX_LINE`]: the rest of it, up to
    /// its end, is dropped.
    cut: bool,
    /// Lines escaped, logged or not: the relay's work a line.
    #[cfg(test)]
    escaped: u64,
}

impl Budget {
    fn new(log: LogBudget) -> Self {
        Budget {
            log,
            reads: TokenBucket::full(READ_RATE, READ_RATE),
            dropped: 0,
            unfinished: Vec::new(),
            cut: false,
            #[cfg(test)]
            escaped: 0,
        }
    }

    /// The lines `data` (just read) ends, after what earlier reads began,
    /// for driver VM `name`: each that fits the budget (its bytes, or
    /// [`LINE_COST`] if more) is appended to `out` as `[name] ` and its
    /// text, its unprintable characters escaped; the others are dropped,
    /// whole. `ended`: its writers are gone, and a line begun is a line.
    fn lines(&mut self, data: &[u8], name: &str, ended: bool, out: &mut Vec<u8>) {
        let share = self.log.clone();
        let mut log = share.lock();
        let mut rest = data;
        while let Some(at) = rest.iter().position(|&byte| byte == b'\n') {
            if log.tokens() < LINE_COST {
                // No line fits: every line this read ends is dropped at
                // once, with no work a line. Before, each went through
                // escaping and the budget's clock first: a vmm writing
                // newlines had the relay spend more than a core on lines
                // it then dropped, the log's lock held meanwhile (a review
                // found it).
                let last = rest.iter().rposition(|&byte| byte == b'\n').unwrap_or(at);
                self.dropped += (self.unfinished.len() + last + 1) as u64;
                self.unfinished.clear();
                self.cut = false;
                rest = &rest[last + 1..];
                break;
            }
            let line = &rest[..at];
            rest = &rest[at + 1..];
            if std::mem::take(&mut self.cut) {
                self.dropped += line.len() as u64 + 1;
            } else if self.unfinished.is_empty() {
                self.line(line, name, &mut log, out);
            } else {
                let mut whole = std::mem::take(&mut self.unfinished);
                whole.extend_from_slice(line);
                self.line(&whole, name, &mut log, out);
            }
        }
        if self.cut {
            self.dropped += rest.len() as u64;
        } else {
            self.unfinished.extend_from_slice(rest);
            if self.unfinished.len() >= MAX_LINE {
                // Passed on cut (`line` cuts it), the rest of it dropped.
                let whole = std::mem::take(&mut self.unfinished);
                self.line(&whole, name, &mut log, out);
                self.cut = !ended;
            }
        }
        if ended && !self.unfinished.is_empty() {
            let whole = std::mem::take(&mut self.unfinished);
            self.line(&whole, name, &mut log, out);
        }
    }

    /// One line (without its end), cut at [`MAX_LINE`], passed on to `out`
    /// if it fits: charged what it adds to the log, escapes included (a
    /// control byte is six bytes escaped; charged its raw bytes, a line of
    /// them added six times the rate, a review found).
    fn line(&mut self, line: &[u8], name: &str, log: &mut Spending<'_>, out: &mut Vec<u8>) {
        let line = match line.len().checked_sub(MAX_LINE) {
            Some(over) if over > 0 => {
                self.dropped += over as u64;
                &line[..MAX_LINE]
            }
            _ => line,
        };
        let available = log.tokens();
        // Escaping never shortens a line: one past the budget as it is is
        // dropped unescaped.
        if (line.len() as u64 + 1).max(LINE_COST) > available {
            self.dropped += line.len() as u64 + 1;
            return;
        }
        #[cfg(test)]
        {
            self.escaped += 1;
        }
        let text = String::from_utf8_lossy(line);
        // The vmm names its own lines so; any other start is kept, behind
        // the name the relay knows (a line claiming another's name shows
        // whose it is).
        let prefix = format!("[{name}] ");
        let text = crate::untrusted_text::escape(text.strip_prefix(prefix.as_str()).unwrap_or(&text));
        let cost = (text.len() as u64 + 1).max(LINE_COST);
        if cost > available {
            self.dropped += line.len() as u64 + 1;
            // It fit as written, not escaped: its device pays for the
            // work, its length as written, so that the relay's work on
            // lines it escapes and drops is bounded by the device's rate
            // (a device's whole budget was spent so at first, and an honest
            // device lost its burst where the whole's budget was short).
            log.spend_device(line.len() as u64 + 1);
            return;
        }
        log.spend(cost);
        out.extend_from_slice(prefix.as_bytes());
        out.extend_from_slice(text.as_bytes());
        out.push(b'\n');
    }
}

/// The relay, its thread started at the first call.
fn relay() -> std::io::Result<Arc<Relay>> {
    static RELAY: Mutex<Option<Arc<Relay>>> = Mutex::new(None);
    let mut started = RELAY.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(relay) = &*started {
        return Ok(relay.clone());
    }
    let relay =
        Arc::new(Relay { epoll: Epoll::new()?, pipes: Mutex::default(), logs: Mutex::default(), all: all_budget() });
    let running = relay.clone();
    std::thread::Builder::new().name("console-relay".into()).spawn(move || running.run())?;
    *started = Some(relay.clone());
    Ok(relay)
}

impl Relay {
    fn pipes(&self) -> std::sync::MutexGuard<'_, HashMap<RawFd, Arc<Pipe>>> {
        self.pipes.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The log budget of device `name`'s driver VMs.
    fn log_for(&self, name: &str) -> LogBudget {
        let mut logs = self.logs.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        logs.entry(name.to_owned()).or_insert_with(|| log_budget(&self.all)).clone()
    }

    /// Watches `read`, driver VM `name`'s output, until its writers are
    /// gone.
    fn add(&self, read: OwnedFd, name: &str) -> std::io::Result<()> {
        let fd = read.as_raw_fd();
        // SAFETY: fcntl(2) on a descriptor we own: a read never blocks the
        // relay's other pipes.
        if unsafe { libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        self.pipes().insert(fd, Arc::new(Pipe::new(File::from(read), name, self.log_for(name))));
        let event = EpollEvent::new(EventSet::IN, fd as u64);
        self.epoll.ctl(ControlOperation::Add, fd, event).inspect_err(|_| {
            self.pipes().remove(&fd);
        })
    }

    fn run(&self) {
        let mut events = vec![EpollEvent::default(); 32];
        let mut buffer = vec![0u8; CHUNK];
        // Pipes read up to their read budget, out of the epoll set until
        // the time given.
        let mut paused: Vec<(RawFd, std::time::Instant)> = Vec::new();
        loop {
            let now = std::time::Instant::now();
            let timeout = paused
                .iter()
                .map(|(_, until)| until.saturating_duration_since(now).as_millis().min(1000) as i32 + 1)
                .min()
                .unwrap_or(-1);
            let ready = match self.epoll.wait(timeout, &mut events) {
                Ok(ready) => ready,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    tracing::error!(%error, "the console relay cannot wait for driver VMs' output; it stops");
                    return;
                }
            };
            let now = std::time::Instant::now();
            paused.retain(|&(fd, until)| {
                if until > now {
                    return true;
                }
                let event = EpollEvent::new(EventSet::IN, fd as u64);
                if self.pipes().contains_key(&fd) && self.epoll.ctl(ControlOperation::Add, fd, event).is_err() {
                    self.pipes().remove(&fd);
                }
                false
            });
            for event in &events[..ready] {
                let fd = event.data() as RawFd;
                let pipe = self.pipes().get(&fd).cloned();
                // Standard error is locked for each write, not the turn:
                // every thread's log lines go through it.
                let flow = pipe.map_or(Flow::Gone, |pipe| copy(&pipe, &mut buffer, &mut std::io::stderr()));
                match flow {
                    Flow::Open => {}
                    Flow::Pause(wait) => {
                        let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
                        paused.push((fd, now + wait));
                    }
                    Flow::Gone => {
                        let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
                        self.pipes().remove(&fd);
                    }
                }
            }
        }
    }
}

/// Reads of one pipe per turn at most: a vmm that writes without pause
/// cannot keep the relay from the others (epoll reports it again).
const READS_PER_TURN: usize = 16;

/// What became of a pipe after a turn.
#[derive(Debug, PartialEq)]
enum Flow {
    /// Still open: read it when it has more.
    Open,
    /// Its read budget is spent: read it again after this long.
    Pause(std::time::Duration),
    /// Its writers are gone (or it failed).
    Gone,
}

/// Copies what `pipe` holds now (at most [`READS_PER_TURN`] reads, within
/// its read budget) to `log` (standard error) within its budget; once its
/// writers are gone (or it failed), says what it dropped since it last
/// could.
fn copy(pipe: &Pipe, buffer: &mut [u8], log: &mut impl Write) -> Flow {
    let mut budget = pipe.budget.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut lines = Vec::new();
    for _ in 0..READS_PER_TURN {
        // Room for a whole read, charged for what it brings.
        if budget.reads.tokens() < buffer.len() as u64 {
            return Flow::Pause(budget.reads.until(buffer.len() as u64));
        }
        match (&pipe.file).read(buffer) {
            Ok(read) if read > 0 => {
                budget.reads.spend(read as u64);
                let dropped = budget.dropped;
                lines.clear();
                budget.lines(&buffer[..read], &pipe.name, false, &mut lines);
                if !lines.is_empty() {
                    // What was lost before these lines is said before them,
                    // a line charged like any (before, notices were free:
                    // a vmm logging one line a read and dropping the rest
                    // doubled its lines, a review found); what this read
                    // loses, or a notice the budget cannot pay, later.
                    if dropped > 0 && budget.log.lock().charge(LINE_COST) {
                        budget.dropped -= dropped;
                        say_dropped(dropped, log);
                    }
                    // One that fails (a reader gone) loses only this output.
                    let _ = log.write_all(&lines);
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => return Flow::Open,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            _ => {
                // The end of its output (a flood is often a driver VM's
                // last act): its last line, and what it lost, now or never.
                lines.clear();
                budget.lines(&[], &pipe.name, true, &mut lines);
                let _ = log.write_all(&lines);
                say_dropped(std::mem::take(&mut budget.dropped), log);
                return Flow::Gone;
            }
        }
    }
    Flow::Open
}

/// Says in the log that `dropped` bytes of a driver VM's output were lost
/// (nothing if none).
fn say_dropped(dropped: u64, log: &mut impl Write) {
    if dropped > 0 {
        let _ = writeln!(
            log,
            "reflector: {dropped} bytes of a driver VM's output dropped (over its log budget: {} KiB a second a \
             device, {} KiB for all devices together)",
            RATE / 1024,
            ALL_RATE / 1024
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
        let (pipe, mut write) = pipe();
        let started = std::time::Instant::now();
        let flood = std::thread::spawn(move || {
            let mut line = [b'x'; 4096];
            line[4095] = b'\n';
            for _ in 0..(8 * BURST / 4096) {
                write.write_all(&line).unwrap();
            }
        });
        let (mut buffer, mut log) = (vec![0u8; CHUNK], Vec::new());
        // 8 MiB: within the read budget's burst, so never paused.
        while copy(&pipe, &mut buffer, &mut log) == Flow::Open {
            std::thread::yield_now();
        }
        flood.join().unwrap();
        let allowed = BURST + started.elapsed().as_micros() as u64 * RATE / 1_000_000 + 64 * 1024;
        let text = String::from_utf8_lossy(&log);
        let flood = |text: &&str| text.bytes().all(|byte| byte == b'x');
        let logged = text
            .lines()
            .filter_map(|line| line.strip_prefix("[vm] "))
            .filter(flood)
            .map(|line| line.len() as u64 + 1)
            .sum::<u64>();
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

    /// A pipe of the test's own, non-blocking at its read end as the
    /// relay's are, and the relay's record of it.
    fn pipe() -> (Pipe, File) {
        pipe_within(super::log_budget(&all_budget()))
    }

    /// As [`pipe`], its lines charged to `log`.
    fn pipe_within(log: LogBudget) -> (Pipe, File) {
        let (read, write) = hardware::descriptors::pipe().unwrap();
        // SAFETY: fcntl(2) on a descriptor this test owns.
        assert_eq!(unsafe { libc::fcntl(read.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) }, 0);
        (Pipe::new(File::from(read), "vm", log), File::from(write))
    }

    /// A device's driver VMs share one log budget, one after another (a
    /// driver crashing at its start got a fresh burst at each restart);
    /// another device's have their own.
    #[test]
    fn a_devices_driver_vms_share_one_log_budget() {
        let relay =
            Relay { epoll: Epoll::new().unwrap(), pipes: Mutex::default(), logs: Mutex::default(), all: all_budget() };
        assert!(Arc::ptr_eq(&relay.log_for("disk0"), &relay.log_for("disk0")));
        assert!(!Arc::ptr_eq(&relay.log_for("disk0"), &relay.log_for("disk1")));
        // The first driver VM spends the burst; its successor, on the same
        // budget, gets at most the rate's refill; another device's, all of
        // its own.
        let logged = |log: LogBudget| {
            let (pipe, mut write) = pipe_within(log);
            let line = [b'x'; 1023];
            let writer = std::thread::spawn(move || {
                for _ in 0..2 * BURST / 1024 {
                    write.write_all(&line).unwrap();
                    write.write_all(b"\n").unwrap();
                }
            });
            let (mut buffer, mut log) = (vec![0u8; CHUNK], Vec::new());
            let started = std::time::Instant::now();
            loop {
                match copy(&pipe, &mut buffer, &mut log) {
                    Flow::Gone => break,
                    Flow::Pause(_) | Flow::Open => std::thread::yield_now(),
                }
            }
            writer.join().unwrap();
            let text = String::from_utf8(log).unwrap();
            (text.lines().filter(|line| line.starts_with("[vm] x")).count() as u64 * 1024, started.elapsed())
        };
        let shared = relay.log_for("disk0");
        let (first, _) = logged(shared.clone());
        let (next, took) = logged(shared);
        let (other, _) = logged(relay.log_for("disk1"));
        assert!(first >= BURST / 2, "the first driver VM's burst was not logged: {first}");
        let refill = RATE * (took.as_millis() as u64 + 1000) / 1000;
        assert!(next <= refill, "the next driver VM logged {next} bytes, a fresh burst; its refill was {refill}");
        assert!(other >= BURST / 2, "another device's driver VM had no burst of its own: {other}");
    }

    /// Lines cost [`LINE_COST`] each at least: a vmm printing empty lines
    /// adds a few thousand to the log, not a million (a journal limits a
    /// service by lines: before, all of a 1 MiB flood of empty lines came
    /// through, about 70,000 lines of a driver's console).
    #[test]
    fn a_vmm_printing_empty_lines_adds_at_most_its_budget_of_lines() {
        let (pipe, mut write) = pipe();
        let started = std::time::Instant::now();
        let flood = std::thread::spawn(move || write.write_all(&vec![b'\n'; 1 << 20]).unwrap());
        let (mut buffer, mut log) = (vec![0u8; CHUNK], Vec::new());
        while copy(&pipe, &mut buffer, &mut log) == Flow::Open {
            std::thread::yield_now();
        }
        flood.join().unwrap();
        // 256 bytes a line: a journal's default limit is 333 lines a second.
        let allowed = (BURST + started.elapsed().as_micros() as u64 * RATE / 1_000_000) / 256;
        // The flood's (empty) lines, and the notes of what was dropped,
        // which are lines too (the last one, at the end, free).
        let text = String::from_utf8_lossy(&log);
        let lines = text.lines().filter(|line| *line == "[vm] ").count() as u64;
        let notes = text.lines().filter(|line| line.starts_with("reflector: ")).count() as u64;
        assert!(lines + notes <= allowed + 2, "{lines} lines and {notes} notes logged, {allowed} allowed");
        assert!(lines >= BURST / 256 / 2, "the burst's lines were not logged: {lines}");
    }

    /// Copies all `pipe` gets until its writers are gone (never paused:
    /// floods here are within the read budget's burst); returns the log.
    fn drain(pipe: &Pipe) -> String {
        let (mut buffer, mut log) = (vec![0u8; CHUNK], Vec::new());
        loop {
            match copy(pipe, &mut buffer, &mut log) {
                Flow::Gone => return String::from_utf8(log).unwrap(),
                Flow::Open => std::thread::yield_now(),
                Flow::Pause(wait) => std::thread::sleep(wait),
            }
        }
    }

    /// Lines past the budget cost the relay no work a line: a flood of
    /// empty lines has only those logged escaped, and lines of control
    /// characters that fit as written but not escaped have a few escaped
    /// a second. Before, every line of either was escaped and its budget's
    /// clock read: a vmm writing newlines had the relay spend more than a
    /// core on lines it dropped (a review found it).
    #[test]
    fn lines_past_the_budget_cost_the_relay_no_work_a_line() {
        let (newlines, mut write) = pipe();
        let started = std::time::Instant::now();
        let flood = std::thread::spawn(move || write.write_all(&vec![b'\n'; 8 << 20]).unwrap());
        let text = drain(&newlines);
        flood.join().unwrap();
        let logged = text.lines().filter(|line| *line == "[vm] ").count() as u64;
        let escaped = newlines.budget.lock().unwrap().escaped;
        let allowed = (BURST + started.elapsed().as_micros() as u64 * RATE / 1_000_000) / LINE_COST + 1;
        assert!(logged >= BURST / LINE_COST / 2, "the burst's lines were not logged: {logged}");
        assert!(escaped <= allowed, "{escaped} of 8,388,608 lines escaped, {logged} logged, {allowed} allowed");

        let (controls, mut write) = pipe();
        let started = std::time::Instant::now();
        let mut line = vec![1u8; 4095];
        line.push(b'\n');
        let flood = std::thread::spawn(move || (0..2048).for_each(|_| write.write_all(&line).unwrap()));
        let text = drain(&controls);
        flood.join().unwrap();
        let logged = text.lines().filter(|line| line.starts_with("[vm] \\u0001")).count() as u64;
        let escaped = controls.budget.lock().unwrap().escaped;
        // Each escaped and dropped line spends its raw length of the
        // device's budget: past the lines logged, what was left of the
        // burst (less than an escaped line, six raw ones) and the refill
        // pay for a raw line's escaping each.
        let refills = started.elapsed().as_micros() as u64 * RATE / 1_000_000 / 4096 + 1;
        assert!(logged >= 1, "no line logged");
        assert!(escaped <= logged + 6 + refills + 1, "{escaped} of 2,048 lines escaped, {logged} logged");
    }

    /// All devices' driver VMs together add at most the whole's budget,
    /// whatever each device's own allows (before, each device had its own
    /// only, and one alone passed a journal's limit for the reflector's
    /// whole service, its own lines included: a review found it).
    #[test]
    fn all_devices_together_add_at_most_the_wholes_budget() {
        let all = all_budget();
        let started = std::time::Instant::now();
        let mut logged = 0;
        for _ in 0..4 {
            let (pipe, mut write) = pipe_within(log_budget(&all));
            let writer = std::thread::spawn(move || {
                let line = [b'x'; 1023];
                for _ in 0..BURST / 1024 + 16 {
                    write.write_all(&line).unwrap();
                    write.write_all(b"\n").unwrap();
                }
            });
            let text = drain(&pipe);
            writer.join().unwrap();
            logged += text.lines().filter(|line| line.starts_with("[vm] x")).count() as u64 * 1024;
        }
        let allowed = ALL_BURST + started.elapsed().as_micros() as u64 * ALL_RATE / 1_000_000;
        assert!(logged <= allowed, "four devices logged {logged} bytes, the whole's budget {allowed}");
        assert!(logged >= ALL_BURST / 2, "the whole's burst was not logged: {logged}");
    }

    /// The relay reads a flooding vmm's output no faster than its read
    /// budget, and then leaves the pipe until the time comes: the vmm
    /// waits on its full pipe, in its own CPU quota. Before, the relay read
    /// and dropped all it could write, a reflector core (a review found it).
    #[test]
    fn a_flooding_vmm_is_read_no_faster_than_its_read_budget() {
        let (pipe, mut write) = pipe();
        let started = std::time::Instant::now();
        let flood = std::thread::spawn(move || {
            let chunk = vec![b'x'; CHUNK];
            (0..4 * READ_RATE / CHUNK as u64).take_while(|_| write.write_all(&chunk).is_ok()).count()
        });
        let (mut buffer, mut log) = (vec![0u8; CHUNK], std::io::sink());
        let mut read = 0;
        let paused = loop {
            let before = pipe.budget.lock().unwrap().reads.tokens();
            match copy(&pipe, &mut buffer, &mut log) {
                Flow::Pause(wait) => break wait,
                Flow::Open => std::thread::yield_now(),
                Flow::Gone => panic!("all of the flood was read without a pause"),
            }
            read += before.saturating_sub(pipe.budget.lock().unwrap().reads.tokens());
        };
        let allowed = READ_RATE + started.elapsed().as_micros() as u64 * READ_RATE / 1_000_000 + CHUNK as u64;
        assert!(read <= allowed, "{read} bytes read before the pause, {allowed} allowed");
        assert!(!paused.is_zero());
        assert!(!flood.is_finished(), "the flooding writer was not held by its full pipe");
        drop(pipe);
        assert!(flood.join().unwrap() < (4 * READ_RATE / CHUNK as u64) as usize);
    }

    /// Every line a driver VM adds to the log starts with its name, is
    /// whole, and holds nothing a terminal acts on, however the vmm wrote
    /// it: in pieces a read ends in the middle of, claiming another driver
    /// VM's name, with escape sequences, or past the longest line. Before,
    /// the relay copied its bytes as they came, so a line cut by a read
    /// was ended by another driver VM's output, and a compromised vmm could
    /// write lines that looked like another's (an adversarial review
    /// found it).
    #[test]
    fn every_line_a_driver_vm_adds_is_whole_named_and_printable() {
        let (honest, mut honest_end) = pipe();
        let (mut hostile, mut hostile_end) = pipe();
        hostile.name = "bad".into();
        let (mut buffer, mut log) = (vec![0u8; CHUNK], Vec::new());
        hostile_end.write_all(b"the start of a line, then\x1b[2J").unwrap();
        assert_eq!(copy(&hostile, &mut buffer, &mut log), Flow::Open);
        honest_end.write_all(b"[vm] an honest line\n").unwrap();
        assert_eq!(copy(&honest, &mut buffer, &mut log), Flow::Open);
        let writer = std::thread::spawn(move || {
            hostile_end.write_all(b" its end\n[vm] attached, all verified\r\x1b[1A\n").unwrap();
            hostile_end.write_all(&vec![b'y'; 3 * MAX_LINE]).unwrap();
            hostile_end.write_all(b"\nafter the long line\n").unwrap();
        });
        while copy(&hostile, &mut buffer, &mut log) != Flow::Gone {
            std::thread::yield_now();
        }
        writer.join().unwrap();
        drop(honest_end);
        let text = String::from_utf8(log).unwrap();
        let (notes, lines): (Vec<&str>, Vec<&str>) = text.lines().partition(|line| line.starts_with("reflector: "));
        assert_eq!(lines[0], "[vm] an honest line", "{text}");
        assert_eq!(lines[1], "[bad] the start of a line, then\\u001b[2J its end", "{text}");
        assert_eq!(lines[2], "[bad] [vm] attached, all verified\\u000d\\u001b[1A", "{text}");
        assert_eq!(lines[3], format!("[bad] {}", "y".repeat(MAX_LINE)), "the long line is cut at the longest");
        assert_eq!(lines[4], "[bad] after the long line", "{text}");
        assert_eq!(lines.len(), 5, "{text}");
        let noted: usize = notes
            .iter()
            .filter_map(|line| line.strip_prefix("reflector: ")?.split(' ').next()?.parse::<usize>().ok())
            .sum();
        assert_eq!(noted, 2 * MAX_LINE + 1, "the rest of the long line is said to be dropped: {notes:?}");
    }

    /// A line is cut at the longest however it came (in one read too),
    /// and charged what it adds to the log, escapes included.
    #[test]
    fn a_line_is_cut_at_the_longest_and_charged_as_escaped() {
        let (pipe, mut write) = pipe();
        let (mut buffer, mut log) = (vec![0u8; CHUNK], Vec::new());
        let mut line = vec![1u8; MAX_LINE + 8 * 1024];
        line.push(b'\n');
        let writer = std::thread::spawn(move || write.write_all(&line).unwrap());
        while copy(&pipe, &mut buffer, &mut log) != Flow::Gone {
            std::thread::yield_now();
        }
        writer.join().unwrap();
        let text = String::from_utf8(log).unwrap();
        let first = text.lines().next().unwrap();
        assert_eq!(first, format!("[vm] {}", "\\u0001".repeat(MAX_LINE)), "the line was not cut at the longest");
        // Six bytes a control byte went to the log, and were charged: what
        // is left of the burst is less by that (refilled meanwhile at most
        // a second's rate).
        let left = pipe.budget.lock().unwrap().log.lock().tokens();
        assert!(
            left <= BURST - 6 * MAX_LINE as u64 + RATE,
            "{left} of {BURST} left after {} bytes logged",
            first.len()
        );
    }
}
