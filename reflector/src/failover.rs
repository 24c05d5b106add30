//! Where a recovery's time goes: the timeline of one failover, from the
//! fault to the first completion of the new driver VM, split into the
//! phases an operator can act on.
//!
//! ```text
//! kill sent ─detection─▶ exit seen ─retire─▶ old VM stopped, hardware quiesced
//!   ─replacement─▶ new driver running (spare let go / cold boot), channel opened
//!   ─device reset─▶ driver attached (its device in a known state)
//!   ─replay─▶ first completion
//!   ─drain─▶ the last request the fault caught answered to the client
//! ```
//!
//! The stall a client sees ends at the first completion only if it had one
//! request in flight; with several, it waits for the last (`drain`). The
//! whole (`total`) is kill (or exit seen) to first completion.
//!
//! Detection is known only for kills the reflector sent itself (an operator's
//! `reflector kill`, the chaos command): for any other fault the moment the
//! driver failed is not observable. The two middle marks are the driver
//! VM's own (`guest_abi::channel::driver_state`, each announced with one
//! doorbell ring): untrusted, so they only ever feed these figures, never
//! a decision, and a driver that lies about them only lies about its own
//! report.

use std::time::{Duration, Instant};

/// The phases of a failover, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// From the reflector's SIGKILL to its seeing the driver VM's exit.
    Detection,
    /// From the exit seen to the old driver VM unable to run and the
    /// hardware quiesced.
    Retire,
    /// From then to the new driver running: a warm spare let go, or a cold
    /// boot (process, VM, guest kernel) up to its opening the channel.
    Replacement,
    /// The new driver bringing its device to a known state (its probe),
    /// up to its attaching to the channel.
    DeviceReset,
    /// From the attach to the first completion of a replayed request.
    Replay,
    /// From the first completion to the answer, delivered to the client, of
    /// the last request that was in flight at the fault (none for a net
    /// device, which replays nothing).
    Drain,
}

/// Every phase, in order.
pub const PHASES: [Phase; 6] =
    [Phase::Detection, Phase::Retire, Phase::Replacement, Phase::DeviceReset, Phase::Replay, Phase::Drain];

impl Phase {
    /// The phase's name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Detection => "detection",
            Phase::Retire => "retire",
            Phase::Replacement => "replacement",
            Phase::DeviceReset => "device_reset",
            Phase::Replay => "replay",
            Phase::Drain => "drain",
        }
    }
}

/// A kill the reflector sent longer ago than this is not the cause of the
/// next fault (the driver VM died before the signal or ignored nothing:
/// SIGKILL takes about a millisecond here).
const KILL_RELEVANCE: Duration = Duration::from_secs(1);

/// The timeline of one failover while it happens.
#[derive(Clone, Debug)]
pub struct Timeline {
    killed: Option<Instant>,
    detected: Instant,
    retired: Option<Instant>,
    replaced: Option<Instant>,
    opened: Option<Instant>,
    attached: Option<Instant>,
    /// The restart waited for a backoff timer: its phases would measure the
    /// policy, not the mechanism.
    delayed: bool,
}

/// A finished failover: each phase's duration (None where it was not
/// observed) and the whole, fault to first completion.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Breakdown {
    /// Per phase, in [`PHASES`] order, microseconds.
    pub phases_us: [Option<u64>; 6],
    /// From the earliest known moment (the kill, else the exit seen) to
    /// the first completion, microseconds.
    pub total_us: u64,
}

impl Timeline {
    /// A fault seen `now`; `killed` is when the reflector last sent a
    /// SIGKILL, if it did.
    pub fn new(now: Instant, killed: Option<Instant>) -> Timeline {
        let killed = killed.filter(|at| *at <= now && now.duration_since(*at) < KILL_RELEVANCE);
        Timeline { killed, detected: now, retired: None, replaced: None, opened: None, attached: None, delayed: false }
    }

    /// The old driver VM can no longer run and its hardware is quiesced.
    pub fn retired(&mut self, now: Instant) {
        self.retired.get_or_insert(now);
    }

    /// The restart waits for a backoff timer.
    pub fn delayed(&mut self) {
        self.delayed = true;
    }

    /// A new driver VM was made current.
    pub fn replaced(&mut self, now: Instant) {
        self.replaced.get_or_insert(now);
    }

    /// The new driver says it opened the channel.
    pub fn opened(&mut self, now: Instant) {
        if self.replaced.is_some() {
            self.opened.get_or_insert(now);
        }
    }

    /// The new driver says it attached (its device is reset).
    pub fn attached(&mut self, now: Instant) {
        if self.replaced.is_some() {
            self.opened.get_or_insert(now);
            self.attached.get_or_insert(now);
        }
    }

    /// Whether the new driver has said it attached.
    pub fn is_attached(&self) -> bool {
        self.attached.is_some()
    }

    /// The breakdown at the first completion `now`; None for a failover
    /// that waited for a backoff or never reached a new driver VM.
    pub fn finish(self, now: Instant) -> Option<Breakdown> {
        if self.delayed {
            return None;
        }
        let (retired, replaced) = (self.retired?, self.replaced?);
        // A driver that never said where it was: its boot, reset and replay
        // count as replacement, the one phase left that it cannot fake.
        let opened = self.opened.unwrap_or(now);
        let attached = self.attached.unwrap_or(opened);
        let span = |from: Instant, to: Instant| Some(to.saturating_duration_since(from).as_micros() as u64);
        let phases_us = [
            self.killed.and_then(|killed| span(killed, self.detected)),
            span(self.detected, retired),
            span(retired, opened.max(replaced)),
            span(opened, attached),
            span(attached, now),
            None,
        ];
        let start = self.killed.unwrap_or(self.detected);
        Some(Breakdown { phases_us, total_us: now.saturating_duration_since(start).as_micros() as u64 })
    }
}

/// A failover past its first completion, until the last request the
/// fault caught has been answered.
#[derive(Clone, Debug)]
pub struct Draining {
    breakdown: Breakdown,
    first_completion: Instant,
}

impl Draining {
    /// `breakdown` ([`Timeline::finish`]) ended at `first_completion`.
    pub fn new(breakdown: Breakdown, first_completion: Instant) -> Draining {
        Draining { breakdown, first_completion }
    }

    /// Every request the fault caught was answered by `now`.
    pub fn drained(mut self, now: Instant) -> Breakdown {
        let drain = now.saturating_duration_since(self.first_completion).as_micros() as u64;
        self.breakdown.phases_us[PHASES.len() - 1] = Some(drain);
        self.breakdown
    }

    /// The failover ended otherwise (another fault came first): its
    /// phases, without the drain.
    pub fn abandoned(self) -> Breakdown {
        self.breakdown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(base: Instant, us: u64) -> Instant {
        base + Duration::from_micros(us)
    }

    #[test]
    fn every_phase_is_the_span_between_its_marks() {
        let t0 = Instant::now();
        let mut timeline = Timeline::new(at(t0, 100), Some(t0));
        timeline.retired(at(t0, 300));
        timeline.replaced(at(t0, 350));
        timeline.opened(at(t0, 1_350));
        timeline.attached(at(t0, 1_850));
        let breakdown = timeline.finish(at(t0, 2_000)).expect("a finished failover");
        assert_eq!(breakdown.phases_us, [Some(100), Some(200), Some(1_050), Some(500), Some(150), None]);
        assert_eq!(breakdown.total_us, 2_000);
        let drained = Draining::new(breakdown, at(t0, 2_000)).drained(at(t0, 2_700));
        assert_eq!(drained.phases_us[5], Some(700));
        assert_eq!(drained.total_us, 2_000, "the whole still ends at the first completion");
        assert_eq!(Draining::new(breakdown, at(t0, 2_000)).abandoned().phases_us[5], None);
    }

    #[test]
    fn a_fault_the_reflector_did_not_cause_has_no_detection_phase() {
        let t0 = Instant::now();
        // No kill, and a kill too old to be this fault's cause.
        for killed in [None, Some(t0)] {
            let mut timeline = Timeline::new(at(t0, 2_000_000), killed);
            timeline.retired(at(t0, 2_000_100));
            timeline.replaced(at(t0, 2_000_200));
            timeline.attached(at(t0, 2_000_400));
            let breakdown = timeline.finish(at(t0, 2_000_500)).expect("a finished failover");
            assert_eq!(breakdown.phases_us[0], None);
            assert_eq!(breakdown.total_us, 500);
        }
    }

    #[test]
    fn a_driver_that_never_reports_its_marks_is_all_replacement() {
        let t0 = Instant::now();
        let mut timeline = Timeline::new(t0, None);
        timeline.retired(at(t0, 10));
        timeline.replaced(at(t0, 20));
        let breakdown = timeline.finish(at(t0, 1_000)).expect("a finished failover");
        assert_eq!(breakdown.phases_us, [None, Some(10), Some(990), Some(0), Some(0), None]);
    }

    #[test]
    fn marks_before_the_replacement_are_not_the_new_drivers() {
        let t0 = Instant::now();
        let mut timeline = Timeline::new(t0, None);
        timeline.retired(at(t0, 10));
        timeline.attached(at(t0, 15));
        assert!(!timeline.is_attached());
        timeline.replaced(at(t0, 20));
        timeline.attached(at(t0, 30));
        let breakdown = timeline.finish(at(t0, 40)).expect("a finished failover");
        assert_eq!(breakdown.phases_us, [None, Some(10), Some(20), Some(0), Some(10), None]);
    }

    #[test]
    fn a_delayed_or_unreplaced_failover_is_not_measured() {
        let t0 = Instant::now();
        let mut delayed = Timeline::new(t0, None);
        delayed.retired(t0);
        delayed.delayed();
        delayed.replaced(t0);
        assert_eq!(delayed.finish(t0), None);
        let mut unreplaced = Timeline::new(t0, None);
        unreplaced.retired(t0);
        assert_eq!(unreplaced.finish(t0), None);
    }
}
