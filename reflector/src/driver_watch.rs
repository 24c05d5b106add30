//! Judges what a driver VM costs, not what it answers: a driver can be
//! correct in every answer and still take a core by spinning while it has
//! nothing to do, by ringing the reflector's doorbell in a loop (each
//! ring wakes a reflector worker), or by giving its device work no request
//! asked for (a simulated device works on the reflector's own threads,
//! outside the driver's CPU quota; the device stops at its allowance,
//! `hw::WorkAllowance`, and waits). Each is a fault like a hang: the
//! driver VM is replaced, and one that keeps doing it exhausts its fault
//! budget. A CPU quota per driver VM (its jail) and the device's allowance
//! bound the damage in the meantime; this makes it visible and ends it.
//!
//! Sans-IO: the device feeds [`ResourceWatch::tick`] the numbers (CPU time,
//! doorbell rings, completions) once per [`WATCH_PERIOD`]; reading them is
//! the caller's job ([`process_cpu_time`]).

use std::time::{Duration, Instant};

/// How often a device looks at its driver VM's costs. One timer wake-up
/// per device per second is noise; a hostile driver is stopped within
/// about two periods.
pub const WATCH_PERIOD: Duration = Duration::from_secs(1);

/// CPU share above which a driver VM that had nothing to do during a whole
/// period is spinning. An idle sample driver uses well under 1 % (it polls
/// 100 us after its last work, then sleeps on an interrupt); a spinning one
/// gets all its vCPU and its jail's CPU quota allow (a core), so the limit
/// must be well below that.
pub const IDLE_CPU_LIMIT: f64 = 0.2;

/// Doorbell rings per period beyond twice the completions that are a
/// flood. A well-behaved driver rings at most once per burst of
/// completions; a looping one rings about 40,000 times a second here
/// (an ioeventfd exit costs about 23 us).
pub const SPARE_RINGS: u64 = 1000;

/// A simulated device's work for its drivers (`hw::WorkAllowance`, in
/// bytes and 4 KiB a command), for the watch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceWork {
    /// The work it has done so far.
    pub done: u64,
    /// The work granted it so far (for each request or frame handed to
    /// its drivers).
    pub granted: u64,
    /// It waits for a grant: its driver gave it more work than its
    /// requests allow (twice them for a block device, once for a card)
    /// and the spare besides. An honest driver never gets there.
    pub waiting: bool,
}

impl DeviceWork {
    /// A device's `allowance` now.
    pub fn of(allowance: &crate::hw::WorkAllowance) -> Self {
        DeviceWork { done: allowance.done(), granted: allowance.granted(), waiting: allowance.exhausted() }
    }
}

/// What a driver VM was caught doing.
#[derive(Clone, Debug, PartialEq)]
pub enum Abuse {
    /// It used this share of a CPU while it had no work.
    SpinningIdle {
        /// CPU share over the period (1.0 = one core).
        cpu: f64,
    },
    /// It rang the reflector's doorbell far more often than it completed.
    DoorbellFlood {
        /// Rings in the period.
        rings: u64,
        /// Completions in the period.
        completions: u64,
    },
    /// It gave its device more work than its requests allow: the device
    /// waits for a grant.
    DeviceOverwork {
        /// The device's work so far (bytes, and 4 KiB a command).
        done: u64,
        /// The work granted it so far.
        granted: u64,
    },
}

impl std::fmt::Display for Abuse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Abuse::SpinningIdle { cpu } => {
                write!(f, "the driver VM used {:.0}% of a CPU with no request to serve", cpu * 100.0)
            }
            Abuse::DoorbellFlood { rings, completions } => {
                write!(f, "the driver VM rang the reflector {rings} times for {completions} completions")
            }
            Abuse::DeviceOverwork { done, granted } => write!(
                f,
                "the driver VM gave its device work no request asked for ({} MiB done, {} MiB granted for its \
                 requests: past its allowance)",
                done >> 20,
                granted >> 20
            ),
        }
    }
}

/// The counters at the start of the current period.
#[derive(Clone, Copy, Debug)]
struct Mark {
    at: Instant,
    cpu: Duration,
    rings: u64,
    completions: u64,
}

/// Watches one device's current driver VM.
#[derive(Debug, Default)]
pub struct ResourceWatch {
    /// The driver VM watched and where its period started.
    mark: Option<(i32, Mark)>,
    /// The driver had work at some time during the period.
    busy: bool,
}

impl ResourceWatch {
    /// The driver VM had work (requests in flight): it may spend CPU.
    pub fn note_busy(&mut self) {
        self.busy = true;
    }

    /// Ends a period of driver VM `pid` with its counters now (`work`:
    /// its device's, where the device counts it); what it was caught doing,
    /// if anything. A new pid starts a new period unjudged, except for its
    /// device's work (the device forgives what a dead driver overspent
    /// when it resumes for the next).
    pub fn tick(
        &mut self,
        pid: i32,
        now: Instant,
        cpu: Duration,
        (rings, completions): (u64, u64),
        work: Option<DeviceWork>,
    ) -> Option<Abuse> {
        let current = Mark { at: now, cpu, rings, completions };
        let busy = std::mem::replace(&mut self.busy, false);
        let previous = self.mark.replace((pid, current));
        if let Some(work) = work.filter(|work| work.waiting) {
            return Some(Abuse::DeviceOverwork { done: work.done, granted: work.granted });
        }
        let previous = match previous {
            Some((watched, previous)) if watched == pid => previous,
            _ => return None,
        };
        let wall = now.saturating_duration_since(previous.at).as_secs_f64();
        let rings = rings.saturating_sub(previous.rings);
        let completions = completions.saturating_sub(previous.completions);
        if rings > completions.saturating_mul(2).saturating_add(SPARE_RINGS) {
            return Some(Abuse::DoorbellFlood { rings, completions });
        }
        let used = cpu.saturating_sub(previous.cpu).as_secs_f64();
        if !busy && wall > 0.0 && used / wall > IDLE_CPU_LIMIT {
            return Some(Abuse::SpinningIdle { cpu: used / wall });
        }
        None
    }

    /// Ends a period of the running driver VM `pid` (the device's child)
    /// with the CPU time it has used (`DriverProcess::cpu_time`: its
    /// cgroup's, every process it made counted), judged with `rings`,
    /// `completions` and `work` (see [`ResourceWatch::tick`]). Nothing if
    /// its CPU time could not be read.
    pub fn look(
        &mut self,
        pid: i32,
        cpu: std::io::Result<Duration>,
        rings: u64,
        completions: u64,
        work: Option<DeviceWork>,
    ) -> Option<Abuse> {
        self.tick(pid, Instant::now(), cpu.ok()?, (rings, completions), work)
    }

    /// Forgets the driver VM watched (it was replaced).
    pub fn forget(&mut self) {
        self.mark = None;
        self.busy = false;
    }
}

/// Resident memory of process `pid` in KiB (`VmRSS` in `/proc/PID/status`),
/// for `status` and the metrics (same caveat as [`process_cpu_time`]).
pub fn process_rss_kib(pid: i32) -> std::io::Result<u64> {
    process_memory_kib(pid).map(|memory| memory.resident)
}

/// A process's resident memory, KiB, and the part of it that is its own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessMemory {
    /// All of it (`VmRSS`).
    pub resident: u64,
    /// Its anonymous memory (`RssAnon`): what no other process shares.
    /// The rest is file pages (a vmm's code and libraries, shared by every
    /// driver VM: 3.4 of a driver VM's 3.8 MiB here) and shared memory
    /// (the channel, the reflector's too).
    pub own: u64,
}

/// [`ProcessMemory`] of `pid`, from `/proc/PID/status` (readable without
/// the right to trace it, unlike `smaps`).
pub fn process_memory_kib(pid: i32) -> std::io::Result<ProcessMemory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Option<u64> {
        status.lines().find_map(|line| line.strip_prefix(name))?.split_whitespace().next()?.parse().ok()
    };
    let resident = field("VmRSS:").ok_or_else(|| std::io::Error::other("no VmRSS"))?;
    Ok(ProcessMemory { resident, own: field("RssAnon:").unwrap_or(resident) })
}

/// CPU time (user and system) process `pid` has used, from
/// `/proc/PID/stat`. Meant for the reflector's own children: a child is
/// not reaped before its watcher sees it gone, so the pid is still its.
pub fn process_cpu_time(pid: i32) -> std::io::Result<Duration> {
    let fields = process_stat(pid, &[14, 15])?;
    let (user, system) = (fields[0], fields[1]);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_nanos((user + system).saturating_mul(1_000_000_000 / hz)))
}

/// Numeric fields `numbers` (1-based, as proc(5) numbers them, from 3 on)
/// of `/proc/PID/stat`, in the order asked.
pub fn process_stat(pid: i32, numbers: &[usize]) -> std::io::Result<Vec<u64>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces and parentheses: fields
    // are counted after its closing parenthesis, which is the last one.
    let rest = stat.rsplit_once(')').map(|(_, rest)| rest).ok_or_else(|| std::io::Error::other("bad stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    numbers
        .iter()
        .map(|number| {
            let field = number.checked_sub(3).and_then(|index| fields.get(index));
            field.and_then(|f| f.parse().ok()).ok_or_else(|| std::io::Error::other("bad stat"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spinning_while_idle_and_flooding_are_caught_and_work_is_not() {
        let mut watch = ResourceWatch::default();
        let start = Instant::now();
        let s = |secs: f64| start + Duration::from_secs_f64(secs);
        let cpu = Duration::from_secs_f64;
        assert_eq!(watch.tick(7, s(0.0), cpu(0.0), (0, 0), None), None, "the first period starts unjudged");
        // Idle and quiet.
        assert_eq!(watch.tick(7, s(1.0), cpu(0.01), (1, 1), None), None);
        // Busy: it may use the CPU.
        watch.note_busy();
        assert_eq!(watch.tick(7, s(2.0), cpu(0.95), (5000, 4000), None), None);
        // Idle, yet spinning its vCPU.
        let caught = watch.tick(7, s(3.0), cpu(1.4), (5001, 4000), None);
        assert!(matches!(caught, Some(Abuse::SpinningIdle { cpu }) if cpu > 0.4), "{caught:?}");
        // Ringing without completing.
        let caught = watch.tick(7, s(4.0), cpu(1.95), (45_001, 4010), None);
        assert_eq!(caught, Some(Abuse::DoorbellFlood { rings: 40_000, completions: 10 }));
        // A new driver VM starts unjudged.
        assert_eq!(watch.tick(8, s(5.0), cpu(0.5), (0, 0), None), None);
        watch.forget();
        assert_eq!(watch.tick(8, s(6.0), cpu(5.0), (0, 0), None), None);
    }

    /// A device that waits for a grant (its driver gave it more work than
    /// its requests allow) is the driver's abuse, in any period, the first
    /// of a new driver VM's too (before, only the driver VM's own CPU was
    /// judged).
    #[test]
    fn a_device_given_work_beyond_its_allowance_is_caught() {
        let mut watch = ResourceWatch::default();
        let start = Instant::now();
        let s = |secs: f64| start + Duration::from_secs_f64(secs);
        let idle = Duration::ZERO;
        let work = |waiting| Some(DeviceWork { done: 200 << 20, granted: 10 << 20, waiting });
        assert_eq!(watch.tick(7, s(0.0), idle, (0, 0), work(false)), None);
        assert_eq!(watch.tick(7, s(1.0), idle, (0, 0), work(false)), None, "within its allowance");
        let caught = watch.tick(7, s(2.0), idle, (0, 0), work(true));
        assert_eq!(caught, Some(Abuse::DeviceOverwork { done: 200 << 20, granted: 10 << 20 }));
        assert!(caught.unwrap().to_string().contains("(200 MiB done, 10 MiB granted for its requests"));
        assert!(watch.tick(8, s(3.0), idle, (0, 0), work(true)).is_some(), "a new driver VM's first period too");
        assert_eq!(watch.tick(8, s(4.0), idle, (0, 0), None), None, "a device that counts nothing");
    }

    #[test]
    fn this_process_has_a_cpu_time() {
        let mut spent = 0u64;
        for i in 0..1_000_000u64 {
            spent = spent.wrapping_add(std::hint::black_box(i));
        }
        std::hint::black_box(spent);
        assert!(process_cpu_time(std::process::id() as i32).is_ok());
        assert!(process_cpu_time(-5).is_err());
    }
}
