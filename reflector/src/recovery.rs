//! Driver VM faults and the restart policy (DESIGN.md, restart protocol).
//!
//! The policy is pure logic over timestamps so that it can be tested without
//! clocks: the device asks it what to do about each fault and when a failed
//! device may try again.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

/// Why a driver VM was replaced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The vmm process exited (guest panic, exception, triple fault,
    /// internal error; or killed by anyone but the reflector, or it ended
    /// itself, without a report): its report, if it gave one.
    Exited(String),
    /// The reflector killed it, as an operator asked (`reflector kill`,
    /// the chaos command's kills).
    Killed,
    /// Pending requests made no progress within the deadline.
    Hang(Duration),
    /// One request went unanswered this long while others were answered
    /// (a driver that withholds it would otherwise keep it waiting for
    /// ever: the hang deadline counts from the last answer of any).
    Withheld(Duration),
    /// An answer broke the channel protocol.
    Violation(String),
    /// The driver VM ran out of memory: its guest used all of its RAM (the
    /// guest's allocator failed: its report says so), or its vmm was
    /// killed by its jail's memory cap (the cgroup's OOM kill count rose
    /// while it lived). Its report, if it gave one.
    OutOfMemory(String),
    /// The driver VM took more than its share (see `driver_watch`).
    Abuse(String),
}

impl Fault {
    /// A short name for counters and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Exited(_) => "exited",
            Fault::Killed => "killed",
            Fault::OutOfMemory(_) => "out_of_memory",
            Fault::Hang(_) | Fault::Withheld(_) => "hang",
            Fault::Violation(_) => "violation",
            Fault::Abuse(_) => "abuse",
        }
    }
}

impl Fault {
    /// How much the driver VM's death counts against the requests it held
    /// ([`Blame`]).
    pub fn blame(&self) -> Blame {
        match self {
            // Abuse (spinning idle, flooding a doorbell, overworking its
            // device) is no sign that a request it held caused it, but a
            // driver that abuses at each watch while it withholds a request
            // must not keep that request for ever: replaced with no blame,
            // it had the request replayed about once a second for good,
            // under the fault budget (an adversarial review found it).
            Fault::Exited(report) if report.is_empty() => Blame::Silent,
            Fault::Abuse(_) => Blame::Silent,
            Fault::Exited(_) | Fault::OutOfMemory(_) | Fault::Hang(_) | Fault::Withheld(_) | Fault::Violation(_) => {
                Blame::Death
            }
            Fault::Killed => Blame::None,
        }
    }

    /// Whether the death is evidence against the requests the driver VM
    /// held ([`Blame::Death`]).
    pub fn blames_requests(&self) -> bool {
        self.blame() == Blame::Death
    }

    /// Whether the driver VM ended of its own doing, as far as the
    /// reflector can tell: anything but a kill it sent as an operator
    /// asked. Such deaths before an attach count toward the crash-loop
    /// limit.
    pub fn own_doing(&self) -> bool {
        !matches!(self, Fault::Killed)
    }
}

/// How much a driver VM's death counts against the requests it held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blame {
    /// None: the reflector killed it as an operator asked (the `kill`
    /// command, the chaos command); a storm of such kills never makes a
    /// request poison.
    None,
    /// A death it reported (a panic, an exception), a hang or a protocol
    /// violation: the request may be its cause; a request in
    /// `poison_deaths` such deaths in a row fails.
    Death,
    /// An end without a report, not at the reflector's hand, or a driver
    /// replaced for abuse (`Fault::Abuse`): a SIGKILL
    /// from anyone else, or a compromised vmm ending itself (exit, or
    /// SIGKILL of its own process), which the reflector cannot tell apart.
    /// It counts, [`SILENT_DEATHS_PER_DEATH`] of them as one death: taken
    /// for a kill from outside, a vmm that ended itself before each
    /// request's deadline, as often as it liked under the fault budget,
    /// kept a request it held waiting for ever (an adversarial review
    /// found it); counted in full, a few kills from outside in quick
    /// succession would fail a request.
    Silent,
}

/// How many deaths without a report ([`Blame::Silent`]) count as one
/// death against the requests in flight.
pub const SILENT_DEATHS_PER_DEATH: u32 = 4;

impl Fault {
    /// The fault of a driver VM that exited with `report`; `capped` if its
    /// jail's memory cap killed it. A guest whose allocator failed panics
    /// with Rust's "memory allocation of N bytes failed" (the report is
    /// untrusted: the classification only names the fault). `killed`: the
    /// reflector killed it as an operator asked, and it gave no report.
    pub fn of_exit(report: String, capped: bool, killed: bool) -> Fault {
        if killed && report.is_empty() && !capped {
            return Fault::Killed;
        }
        let allocation_failed = serde_json::from_str::<serde_json::Value>(&report).is_ok_and(|value| {
            value["outcome"] == "panic"
                && value["message"].as_str().is_some_and(|message| message.contains("memory allocation of"))
        });
        if capped || allocation_failed {
            Fault::OutOfMemory(report)
        } else {
            Fault::Exited(report)
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Exited(report) if report.is_empty() => write!(f, "the driver VM exited without a report"),
            Fault::Exited(report) => write!(f, "the driver VM exited: {report}"),
            Fault::Killed => write!(f, "the driver VM was killed as an operator asked"),
            Fault::OutOfMemory(report) if report.is_empty() => {
                write!(f, "the driver VM ran out of memory: killed by its memory cap")
            }
            Fault::OutOfMemory(report) => write!(f, "the driver VM ran out of memory: {report}"),
            Fault::Hang(deadline) => write!(f, "no progress on pending requests for {} ms", deadline.as_millis()),
            Fault::Withheld(waited) => {
                write!(f, "a request went unanswered for {} ms while others were answered", waited.as_millis())
            }
            Fault::Violation(what) => write!(f, "protocol violation: {what}"),
            Fault::Abuse(what) => write!(f, "{what}"),
        }
    }
}

/// Default hang deadline: pending requests with no completion for this long
/// mean a hung driver VM. A 128 KiB request takes well under a millisecond
/// and a driver VM boots in about 3 ms, so 500 ms is far above any honest
/// stall even with QEMU's TCG guest competing for the two cores.
pub const DEFAULT_HANG_DEADLINE: Duration = Duration::from_millis(500);
/// Default poison limit: a request that was in this many dying driver VMs
/// in a row completes with an error. The first death may be anyone's fault
/// (the request only shared the driver VM); after it, suspects are sent
/// alone, so two more deaths with the request alone in the driver VM name
/// it.
pub const DEFAULT_POISON_DEATHS: u32 = 3;
/// How the device handles faults.
#[derive(Clone, Copy, Debug)]
pub struct RecoveryConfig {
    /// When to give up on a driver VM that makes no progress.
    pub hang_deadline: Duration,
    /// Restart budget and backoff.
    pub policy: RestartPolicy,
    /// What to keep ready to replace the driver VM (`spare=`).
    pub spare: Option<crate::driver_vms::SpareKind>,
    /// A request in flight in this many dying driver VMs completes with an
    /// error (block: requests are replayed; net frames never are).
    pub poison_deaths: u32,
}

impl Default for RecoveryConfig {
    fn default() -> Self {
        RecoveryConfig {
            hang_deadline: DEFAULT_HANG_DEADLINE,
            policy: RestartPolicy::default(),
            spare: None,
            poison_deaths: DEFAULT_POISON_DEATHS,
        }
    }
}

/// The numbers of the policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Most faults tolerated within `window`; one more fails the device.
    pub budget: u32,
    /// The window faults are counted in.
    pub window: Duration,
    /// Delay before the second restart in a row; doubles with each further
    /// fault that comes before the driver VM has stayed up for `stable_after`.
    pub backoff_start: Duration,
    /// Longest delay between restarts.
    pub backoff_max: Duration,
    /// A driver VM that stayed up this long resets the backoff.
    pub stable_after: Duration,
    /// How long a failed device waits before it tries again.
    pub cool_down: Duration,
    /// Driver VMs in a row that die within `stable_after` of their start
    /// after which the device fails: its driver never comes up.
    pub crash_loop_limit: u32,
}

impl Default for RestartPolicy {
    /// 20 faults per 10 s: one fault per second, forever, never fails the
    /// device, while a driver that dies at once on every boot (hundreds of
    /// faults a second) is given up on within a second. A restart is
    /// immediate (the stall is what the client sees) unless the previous
    /// driver VM died within 100 ms of starting (about 30 boots' worth: a
    /// crash loop, not a driver that served and then failed); those back off
    /// from 5 ms (about two driver VM boots) to 1 s. Twelve such deaths in a
    /// row (about 4.3 s of backoff) fail the device: a driver VM boots in
    /// about 3 ms, so twelve that each die within 100 ms are a driver that
    /// never comes up, not bad luck; without this limit the backoff spaces
    /// faults so far apart that the budget is never reached. Twelve leaves
    /// room for a storm of external kills (the tests kill ten driver VMs in
    /// a row as each starts, and the client must see no error).
    fn default() -> Self {
        RestartPolicy {
            budget: 20,
            window: Duration::from_secs(10),
            backoff_start: Duration::from_millis(5),
            backoff_max: Duration::from_secs(1),
            stable_after: Duration::from_millis(100),
            cool_down: Duration::from_secs(10),
            crash_loop_limit: 12,
        }
    }
}

/// What to do about a fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Start a new driver VM after this delay (zero: now).
    Restart(Duration),
    /// Too many faults: fail the device until the cool-down ends.
    Fail,
}

/// The policy's memory of recent faults.
#[derive(Clone, Debug)]
pub struct RestartTracker {
    policy: RestartPolicy,
    faults: VecDeque<Instant>,
    last_start: Option<Instant>,
    consecutive: u32,
}

impl RestartTracker {
    /// A tracker for `policy`.
    pub fn new(policy: RestartPolicy) -> Self {
        RestartTracker { policy, faults: VecDeque::new(), last_start: None, consecutive: 0 }
    }

    /// The policy.
    pub fn policy(&self) -> &RestartPolicy {
        &self.policy
    }

    /// Records that a driver VM started at `now`.
    pub fn started(&mut self, now: Instant) {
        self.last_start = Some(now);
    }

    /// Decides what to do about a fault at `now`.
    pub fn on_fault(&mut self, now: Instant) -> Decision {
        while self.faults.front().is_some_and(|t| now.duration_since(*t) > self.policy.window) {
            self.faults.pop_front();
        }
        self.faults.push_back(now);
        if self.faults.len() > self.policy.budget as usize {
            return Decision::Fail;
        }
        let stable = self.last_start.is_none_or(|start| now.duration_since(start) >= self.policy.stable_after);
        self.consecutive = if stable { 0 } else { self.consecutive + 1 };
        if self.consecutive >= self.policy.crash_loop_limit {
            return Decision::Fail;
        }
        if self.consecutive == 0 {
            return Decision::Restart(Duration::ZERO);
        }
        let factor = 1u32.checked_shl(self.consecutive - 1).unwrap_or(u32::MAX);
        Decision::Restart(self.policy.backoff_start.saturating_mul(factor).min(self.policy.backoff_max))
    }

    /// Driver VMs in a row that died within `stable_after` of their start.
    pub fn early_deaths(&self) -> u32 {
        self.consecutive
    }

    /// Forgets past faults: after a cool-down, or when an operator asks.
    pub fn reset(&mut self) {
        self.faults.clear();
        self.consecutive = 0;
        self.last_start = None;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn running_out_of_memory_is_named_as_such() {
        let allocation = r#"{"outcome":"panic","message":"memory allocation of 262144 bytes failed at faulty.rs:9"}"#;
        assert_eq!(Fault::of_exit(allocation.into(), false, false).kind(), "out_of_memory");
        assert_eq!(Fault::of_exit(String::new(), true, false).kind(), "out_of_memory");
        assert!(Fault::of_exit(String::new(), true, false).to_string().contains("killed by its memory cap"));
        let panic = r#"{"outcome":"panic","message":"index out of bounds"}"#;
        assert_eq!(Fault::of_exit(panic.into(), false, false).kind(), "exited");
        assert_eq!(Fault::of_exit("not json".into(), false, false).kind(), "exited");
        // Without a report: killed as an operator asked only if the
        // reflector sent the kill; else it may have ended itself.
        assert_eq!(Fault::of_exit(String::new(), false, true), Fault::Killed);
        assert!(!Fault::Killed.blames_requests());
        assert_eq!(Fault::of_exit(String::new(), false, false).blame(), Blame::Silent);
        assert!(Fault::of_exit(String::new(), false, false).own_doing());
        assert_eq!(Fault::of_exit(panic.into(), false, true).kind(), "exited");
        assert!(Fault::of_exit(allocation.into(), false, false).blames_requests());
    }

    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn one_fault_per_second_restarts_at_once_forever() {
        let mut tracker = RestartTracker::new(RestartPolicy::default());
        let t0 = Instant::now();
        for second in 0..1000u64 {
            let now = t0 + Duration::from_secs(second);
            assert_eq!(tracker.on_fault(now), Decision::Restart(Duration::ZERO), "fault {second}");
            tracker.started(now);
        }
    }

    #[test]
    fn quick_repeated_faults_back_off_exponentially_up_to_the_cap() {
        let policy = RestartPolicy { budget: 1000, crash_loop_limit: 1000, ..RestartPolicy::default() };
        let mut tracker = RestartTracker::new(policy);
        let mut now = Instant::now();
        let mut delays = Vec::new();
        for _ in 0..12 {
            match tracker.on_fault(now) {
                Decision::Restart(delay) => {
                    delays.push(delay);
                    now += delay;
                    tracker.started(now);
                    now += ms(1);
                }
                Decision::Fail => panic!("budget is large"),
            }
        }
        assert_eq!(&delays[..5], &[ms(0), ms(5), ms(10), ms(20), ms(40)]);
        assert_eq!(*delays.last().unwrap(), ms(1000));
        // A driver VM that stays up resets the backoff.
        now += Duration::from_millis(150);
        assert_eq!(tracker.on_fault(now), Decision::Restart(Duration::ZERO));
    }

    #[test]
    fn exhausting_the_budget_fails_until_reset() {
        let policy = RestartPolicy { budget: 3, window: Duration::from_secs(10), ..RestartPolicy::default() };
        let mut tracker = RestartTracker::new(policy);
        let t0 = Instant::now();
        for i in 0..3 {
            assert!(matches!(tracker.on_fault(t0 + ms(i)), Decision::Restart(_)));
        }
        assert_eq!(tracker.on_fault(t0 + ms(3)), Decision::Fail);
        // Faults age out of the window.
        assert!(matches!(tracker.on_fault(t0 + Duration::from_secs(30)), Decision::Restart(_)));
        tracker.reset();
        for i in 0..3 {
            assert!(matches!(tracker.on_fault(t0 + Duration::from_secs(31) + ms(i)), Decision::Restart(_)));
        }
    }

    #[test]
    fn a_driver_that_never_comes_up_fails_the_device_within_seconds() {
        // Each driver VM dies 2 ms after its start; the restart waits for
        // the backoff. The budget alone (20 per 10 s) is never reached:
        // the backoff spaces the faults a second apart.
        let mut tracker = RestartTracker::new(RestartPolicy::default());
        let t0 = Instant::now();
        let mut now = t0;
        tracker.started(now);
        let mut faults = 0;
        loop {
            now += ms(2);
            faults += 1;
            match tracker.on_fault(now) {
                Decision::Restart(delay) => {
                    now += delay;
                    tracker.started(now);
                }
                Decision::Fail => break,
            }
            assert!(faults < 100, "never failed");
        }
        assert_eq!(faults, 12);
        assert!(now - t0 < Duration::from_secs(5), "failed after {:?}", now - t0);
    }

    #[test]
    fn faults_describe_themselves() {
        assert_eq!(Fault::Hang(ms(500)).to_string(), "no progress on pending requests for 500 ms");
        assert_eq!(Fault::Exited(String::new()).kind(), "exited");
        assert_eq!(Fault::Killed.kind(), "killed");
        assert!(Fault::Violation("bad id".into()).to_string().contains("bad id"));
    }
}
