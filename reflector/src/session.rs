//! The life of a device's driver VMs as a sans-IO state machine: which
//! driver VM state the device is in, and what to do about each event. No
//! clocks, processes or descriptors here: the device feeds events with the
//! time they happened and carries out the effects returned, in order
//! (DESIGN.md, restart protocol). Shared by every kind of device.
//!
//! ```text
//!            fault (restart now)            Launched
//!   Running ───────────────────► Restarting ─────────► Running
//!      │  fault (backoff d)           ▲
//!      ├────────────────► BackingOff ─┘ timer
//!      │  fault (budget or crash loop)
//!      └────────────────► Failed ──────┘ timer (cool-down) / recover
//! ```

use std::time::{Duration, Instant};

use crate::recovery::{Decision, Fault, RestartPolicy, RestartTracker};

/// Where a device stands with its driver VM; each state carries its data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lifecycle {
    /// A driver VM serves the channel.
    Running {
        /// Since when.
        since: Instant,
        /// Requests were pending when it last completed one (or started).
        last_progress: Instant,
    },
    /// The driver VM is gone; a new one is being started now.
    Restarting {
        /// Why the last one went.
        why: Fault,
    },
    /// The driver VM is gone; a new one starts at `until` (backoff).
    BackingOff {
        /// When the restart is due.
        until: Instant,
        /// Why the last one went.
        why: Fault,
    },
    /// Too many faults: requests fail until the cool-down ends or an
    /// operator asks to recover.
    Failed {
        /// When the cool-down ends.
        until: Instant,
        /// What made it fail.
        why: Fault,
    },
}

impl Lifecycle {
    /// The name operators see (`reflector status`), an index into
    /// `metrics::STATE_NAMES`.
    pub fn index(&self) -> u64 {
        match self {
            Lifecycle::Running { .. } => 0,
            Lifecycle::Restarting { .. } | Lifecycle::BackingOff { .. } => 1,
            Lifecycle::Failed { .. } => 2,
        }
    }
}

/// Longest a driver VM may take from its start to attaching to the
/// channel (booting and resetting its device) while requests wait, before
/// it counts as hung. A driver VM attaches 2-8 ms after its start here
/// (`ready_us` in its reports), but with the two cores shared by parallel
/// tests one was seen still at its entry point 100 ms after its start: a
/// hang deadline tuned for attached drivers (tests use 100 ms) must not
/// apply to a boot. A request never waits longer than this for a driver
/// that never comes up.
pub const BOOT_DEADLINE: Duration = Duration::from_secs(2);

/// A request's own deadline, in hang deadlines (see `Session::request_deadline`):
/// 2 s with the default 500 ms.
pub const REQUEST_DEADLINE_FACTOR: u32 = 4;

/// What happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The driver VM failed (exited, answered wrongly, abused its share).
    Fault(Fault),
    /// The periodic hang check: whether requests are pending in the driver
    /// VM, and whether it has attached to the channel (before that it is
    /// booting and resetting its device, and has [`BOOT_DEADLINE`]).
    HangCheck {
        /// Requests are pending.
        pending: bool,
        /// The driver VM has attached.
        attached: bool,
        /// When the request that has been in the driver VM longest was
        /// sent to it (a receive buffer, which waits for frames, is none).
        oldest: Option<Instant>,
    },
    /// The restart (or cool-down) timer fired.
    TimerFired,
    /// An operator asked a failed (or backing-off) device to try now.
    Recover,
    /// An operator asked to kill the driver VM.
    Kill,
    /// The driver VM asked for by [`Effect::Launch`] runs.
    Launched,
    /// [`Effect::Launch`] could not start one.
    LaunchFailed(String),
}

/// What the device must do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Kill the driver VM and wait until it cannot run; quiesce the
    /// hardware; keep the answers it gave that pass every check.
    Retire(Fault),
    /// Start a new driver VM on a new channel generation (a warm spare if
    /// one is booted), resume the hardware, and report [`Event::Launched`]
    /// or [`Event::LaunchFailed`]; then replay.
    Launch,
    /// Arm the restart timer for this long.
    ArmTimer(Duration),
    /// Complete every pending request with an error (the device failed).
    FailPending,
    /// SIGKILL the driver VM (its exit arrives as a fault).
    Kill,
    /// Have the hardware start afresh at the next launch
    /// ([`RENEW_AFTER`] driver VMs in a row died at their start).
    Renew,
}

/// Driver VMs in a row that die before they attach to their channel (their
/// device never came up), or at their start (within the policy's
/// `stable_after`), of their own doing (a panic, an exception, a hang, a
/// broken protocol: `Fault::blames_requests`) after which the hardware is
/// renewed before the next launch: a dead driver may have left state that
/// outlives the device's reset and makes every successor fail (a device
/// model's namespace formatted to a block format the driver refuses).
/// Kills from outside do not count. Three: a driver that never comes up
/// gets a fresh device four times (a device model: a new QEMU process,
/// about 50 ms each) before the device fails (`crash_loop_limit`, twelve).
pub const RENEW_AFTER: u32 = 3;

/// The state machine.
#[derive(Debug)]
pub struct Session {
    state: Lifecycle,
    tracker: RestartTracker,
    hang_deadline: Duration,
    /// Driver VMs in a row that died before they attached, or at their
    /// start, of their own doing (`Fault::blames_requests`), for
    /// [`Effect::Renew`].
    own_early_deaths: u32,
    /// Driver VMs in a row that died of their own doing (any fault but a
    /// kill an operator asked for) before they attached, however long each lived.
    /// At the policy's `crash_loop_limit` the device fails, as in a crash
    /// loop: drivers that each live past `stable_after` and never bring the
    /// device up blame no request (`Blk::retired`), so without this a
    /// request would be replayed to them for ever.
    unattached_deaths: u32,
    /// When the running driver VM attached to its channel, if it has.
    attached_at: Option<Instant>,
}

impl Session {
    /// A session whose first driver VM started at `now`.
    pub fn new(policy: RestartPolicy, hang_deadline: Duration, now: Instant) -> Self {
        let mut tracker = RestartTracker::new(policy);
        tracker.started(now);
        Session {
            state: Lifecycle::Running { since: now, last_progress: now },
            tracker,
            hang_deadline,
            own_early_deaths: 0,
            unattached_deaths: 0,
            attached_at: None,
        }
    }

    /// How long pending requests may see no progress: the hang deadline
    /// once the driver VM has attached, at least [`BOOT_DEADLINE`] before.
    fn deadline(&self, attached: bool) -> Duration {
        if attached {
            self.hang_deadline
        } else {
            self.hang_deadline.max(BOOT_DEADLINE)
        }
    }

    /// How long one request may stay in a driver VM while others are
    /// answered: [`REQUEST_DEADLINE_FACTOR`] hang deadlines, so that a
    /// request queued behind a slow one (a flush behind many writes) on a
    /// loaded machine is not taken for withheld; and [`BOOT_DEADLINE`]
    /// more in one that has not said it attached (a request sent while it
    /// boots waits for its start). Whatever the driver says: a driver that
    /// never claimed to attach, and withheld one request while answering
    /// the others, kept it for ever.
    fn request_deadline(&self, attached: bool) -> Duration {
        let deadline = self.hang_deadline * REQUEST_DEADLINE_FACTOR;
        if attached {
            deadline
        } else {
            deadline + BOOT_DEADLINE
        }
    }

    /// The current state.
    pub fn state(&self) -> &Lifecycle {
        &self.state
    }

    /// Whether a driver VM serves the channel.
    pub fn running(&self) -> bool {
        matches!(self.state, Lifecycle::Running { .. })
    }

    /// Whether the device has failed (requests complete with errors).
    pub fn failed(&self) -> bool {
        matches!(self.state, Lifecycle::Failed { .. })
    }

    /// A request completed at `now`, or the first was sent to an idle
    /// driver VM: the hang deadline counts from here.
    pub fn progress(&mut self, now: Instant) {
        if let Lifecycle::Running { last_progress, .. } = &mut self.state {
            *last_progress = now;
        }
    }

    /// The running driver VM attached to its channel at `now`: it brought
    /// its device up.
    pub fn attached(&mut self, now: Instant) {
        self.attached_at.get_or_insert(now);
    }

    /// Since when a request sent at `sent` has waited on the running driver
    /// VM: one sent before it attached (a replay, sent as it was launched)
    /// waited for its boot, which is not the driver's withholding.
    fn waiting_since(&self, sent: Instant) -> Instant {
        self.attached_at.map_or(sent, |attached| sent.max(attached))
    }

    /// Handles `event`, which happened at `now`; returns the effects to
    /// carry out, in order.
    pub fn on(&mut self, event: Event, now: Instant) -> Vec<Effect> {
        match (event, &self.state) {
            (Event::Fault(fault), Lifecycle::Running { .. }) => self.fault(fault, now),
            (Event::HangCheck { pending: true, attached, .. }, Lifecycle::Running { last_progress, .. })
                if now.saturating_duration_since(*last_progress) >= self.deadline(attached) =>
            {
                self.fault(Fault::Hang(self.deadline(attached)), now)
            }
            (Event::HangCheck { pending: true, attached, oldest: Some(sent) }, Lifecycle::Running { .. })
                if now.saturating_duration_since(self.waiting_since(sent)) >= self.request_deadline(attached) =>
            {
                self.fault(Fault::Withheld(now.saturating_duration_since(self.waiting_since(sent))), now)
            }
            (Event::TimerFired, Lifecycle::BackingOff { until, why }) if now >= *until => {
                self.state = Lifecycle::Restarting { why: why.clone() };
                vec![Effect::Launch]
            }
            (Event::TimerFired, Lifecycle::Failed { until, why }) if now >= *until => {
                tracing::info!("cool-down over: trying a new driver VM");
                self.tracker.reset();
                self.state = Lifecycle::Restarting { why: why.clone() };
                vec![Effect::Launch]
            }
            (Event::Recover, Lifecycle::Failed { why, .. } | Lifecycle::BackingOff { why, .. }) => {
                self.tracker.reset();
                self.unattached_deaths = 0;
                self.state = Lifecycle::Restarting { why: why.clone() };
                vec![Effect::Launch]
            }
            (Event::Kill, Lifecycle::Running { .. }) => vec![Effect::Kill],
            (Event::Launched, Lifecycle::Restarting { .. }) => {
                self.tracker.started(now);
                self.attached_at = None;
                self.state = Lifecycle::Running { since: now, last_progress: now };
                Vec::new()
            }
            (Event::LaunchFailed(error), Lifecycle::Restarting { .. }) => {
                // Counts like any fault of a driver VM that died at its
                // start: a vmm that cannot start at all backs off and ends
                // the device failed, not retried forever.
                self.tracker.started(now);
                self.decide(Fault::Exited(format!("cannot start a driver VM: {error}")), now, Vec::new())
            }
            // Everything else changes nothing: a fault of a driver VM that is
            // already gone, a timer of an earlier state, a recover or kill
            // while running or restarting.
            _ => Vec::new(),
        }
    }

    fn fault(&mut self, fault: Fault, now: Instant) -> Vec<Effect> {
        self.decide(fault.clone(), now, vec![Effect::Retire(fault)])
    }

    /// The policy's answer to a fault at `now`, after `effects`.
    fn decide(&mut self, why: Fault, now: Instant, mut effects: Vec<Effect>) -> Vec<Effect> {
        let decision = self.tracker.on_fault(now);
        // A death counts if the driver never brought its device up, or
        // died at its start; only deaths of the drivers' own doing count:
        // a storm of kills from outside says nothing about the device.
        let early = self.attached_at.is_none() || self.tracker.early_deaths() > 0;
        self.own_early_deaths = match (early, why.blames_requests()) {
            (false, _) => 0,
            (true, true) => self.own_early_deaths + 1,
            (true, false) => self.own_early_deaths,
        };
        if why.blames_requests() && self.own_early_deaths > 0 && self.own_early_deaths.is_multiple_of(RENEW_AFTER) {
            effects.push(Effect::Renew);
        }
        let own_doing = why.own_doing();
        self.unattached_deaths = match (self.attached_at.is_some(), own_doing) {
            (true, _) => 0,
            (false, true) => self.unattached_deaths + 1,
            (false, false) => self.unattached_deaths,
        };
        let decision = match decision {
            Decision::Restart(_) if self.unattached_deaths >= self.tracker.policy().crash_loop_limit => Decision::Fail,
            decision => decision,
        };
        match decision {
            Decision::Restart(delay) if delay.is_zero() => {
                self.state = Lifecycle::Restarting { why };
                effects.push(Effect::Launch);
            }
            Decision::Restart(delay) => {
                self.state = Lifecycle::BackingOff { until: now + delay, why };
                effects.push(Effect::ArmTimer(delay));
            }
            Decision::Fail => {
                let cool_down = self.tracker.policy().cool_down;
                self.state = Lifecycle::Failed { until: now + cool_down, why };
                effects.extend([Effect::FailPending, Effect::ArmTimer(cool_down)]);
            }
        }
        effects
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A session whose first driver VM attached.
    fn session(t0: Instant) -> Session {
        let mut session = Session::new(RestartPolicy { budget: 3, ..RestartPolicy::default() }, ms(500), t0);
        session.attached(t0);
        session
    }

    fn exited() -> Fault {
        Fault::Exited("killed".into())
    }

    /// The driver VM asked for runs at `now`, and attaches.
    fn launch(session: &mut Session, now: Instant) {
        launch_unattached(session, now);
        session.attached(now);
    }

    /// The driver VM asked for runs at `now`; it has not attached yet.
    fn launch_unattached(session: &mut Session, now: Instant) {
        assert_eq!(session.on(Event::Launched, now), vec![]);
        assert!(session.running());
    }

    #[test]
    fn a_fault_while_running_retires_the_driver_vm_and_launches_another() {
        let t0 = Instant::now();
        let mut session = session(t0);
        let t1 = t0 + ms(1000);
        assert_eq!(session.on(Event::Fault(exited()), t1), vec![Effect::Retire(exited()), Effect::Launch]);
        assert_eq!(session.state(), &Lifecycle::Restarting { why: exited() });
        assert_eq!(session.state().index(), 1);
        launch(&mut session, t1 + ms(3));
        assert_eq!(session.state(), &Lifecycle::Running { since: t1 + ms(3), last_progress: t1 + ms(3) });
    }

    #[test]
    fn a_quick_second_fault_backs_off_then_the_timer_launches() {
        let t0 = Instant::now();
        let mut session = session(t0);
        session.on(Event::Fault(exited()), t0 + ms(1000));
        launch(&mut session, t0 + ms(1001));
        let t2 = t0 + ms(1002);
        assert_eq!(session.on(Event::Fault(exited()), t2), vec![Effect::Retire(exited()), Effect::ArmTimer(ms(5))]);
        assert_eq!(session.state(), &Lifecycle::BackingOff { until: t2 + ms(5), why: exited() });
        assert_eq!(session.on(Event::TimerFired, t2 + ms(4)), vec![], "early: a stale timer");
        assert_eq!(session.on(Event::TimerFired, t2 + ms(5)), vec![Effect::Launch]);
        launch(&mut session, t2 + ms(8));
    }

    #[test]
    fn exhausting_the_budget_fails_the_device_until_the_cool_down_or_a_recover() {
        let t0 = Instant::now();
        let mut session = session(t0);
        let mut now = t0;
        for _ in 0..3 {
            now += Duration::from_secs(1);
            assert_eq!(session.on(Event::Fault(exited()), now), vec![Effect::Retire(exited()), Effect::Launch]);
            launch(&mut session, now);
        }
        now += Duration::from_secs(1);
        let cool_down = RestartPolicy::default().cool_down;
        assert_eq!(
            session.on(Event::Fault(exited()), now),
            vec![Effect::Retire(exited()), Effect::FailPending, Effect::ArmTimer(cool_down)]
        );
        assert!(session.failed());
        assert_eq!(session.state().index(), 2);
        assert_eq!(session.on(Event::Fault(exited()), now), vec![], "nothing runs to fault");
        assert_eq!(session.on(Event::Kill, now), vec![], "nothing runs to kill");
        assert_eq!(session.on(Event::TimerFired, now + ms(1)), vec![], "the cool-down is not over");
        assert_eq!(session.on(Event::Recover, now + ms(2)), vec![Effect::Launch], "an operator recovers");
        launch(&mut session, now + ms(5));
        // The budget starts afresh.
        assert_eq!(
            session.on(Event::Fault(exited()), now + Duration::from_secs(1)),
            vec![Effect::Retire(exited()), Effect::Launch]
        );
    }

    #[test]
    fn the_cool_down_ends_in_a_new_driver_vm() {
        let t0 = Instant::now();
        let policy = RestartPolicy { budget: 0, ..RestartPolicy::default() };
        let mut session = Session::new(policy, ms(500), t0);
        let effects = session.on(Event::Fault(exited()), t0 + ms(1));
        assert!(effects.contains(&Effect::FailPending));
        assert_eq!(session.on(Event::TimerFired, t0 + ms(1) + policy.cool_down), vec![Effect::Launch]);
        launch(&mut session, t0 + ms(1) + policy.cool_down);
    }

    #[test]
    fn a_hang_is_a_fault_only_with_requests_pending_past_the_deadline() {
        let t0 = Instant::now();
        let mut session = session(t0);
        assert_eq!(
            session.on(Event::HangCheck { pending: false, attached: true, oldest: None }, t0 + ms(10_000)),
            vec![]
        );
        session.progress(t0 + ms(10_000));
        assert_eq!(
            session.on(Event::HangCheck { pending: true, attached: true, oldest: None }, t0 + ms(10_499)),
            vec![]
        );
        let hang = Fault::Hang(ms(500));
        assert_eq!(
            session.on(Event::HangCheck { pending: true, attached: true, oldest: None }, t0 + ms(10_500)),
            vec![Effect::Retire(hang.clone()), Effect::Launch]
        );
        assert_eq!(session.state(), &Lifecycle::Restarting { why: hang });
    }

    /// A driver that answers every request but one keeps the device making
    /// progress, so the hang deadline never passes; the request it
    /// withholds has a deadline of its own.
    #[test]
    fn a_request_withheld_while_others_are_answered_is_a_fault_past_its_own_deadline() {
        let t0 = Instant::now();
        let mut driver = session(t0);
        let withheld = REQUEST_DEADLINE_FACTOR * ms(500);
        let check = |oldest| Event::HangCheck { pending: true, attached: true, oldest: Some(oldest) };
        // Others are answered all along.
        driver.progress(t0 + withheld);
        assert_eq!(driver.on(check(t0 + ms(1)), t0 + withheld), vec![], "not yet past its own deadline");
        driver.progress(t0 + withheld + ms(1));
        let fault = Fault::Withheld(withheld);
        assert_eq!(
            driver.on(check(t0 + ms(1)), t0 + withheld + ms(1)),
            vec![Effect::Retire(fault.clone()), Effect::Launch]
        );
        assert_eq!(driver.state(), &Lifecycle::Restarting { why: fault });
        // A driver VM that has not said it attached has the boot deadline
        // more (a request sent while it boots waits for its start), and
        // then the same: before, none at all, whatever it answered.
        let mut booting = session(t0);
        let unattached = Event::HangCheck { pending: true, attached: false, oldest: Some(t0) };
        let late = t0 + withheld + BOOT_DEADLINE;
        booting.progress(late - ms(1));
        assert_eq!(booting.on(unattached.clone(), late - ms(1)), vec![], "not yet past its boot and own deadline");
        booting.progress(late);
        let fault = Fault::Withheld(withheld + BOOT_DEADLINE);
        assert_eq!(booting.on(unattached, late), vec![Effect::Retire(fault), Effect::Launch]);
    }

    /// A request sent as its driver VM was launched (a replay) waits for
    /// that driver VM's boot: its own deadline counts from the attach.
    /// Before, it counted from the send, and with a short hang deadline a
    /// boot of 440 ms had the replays taken for withheld at the first look
    /// after the attach, the driver blamed, and the requests a death closer
    /// to their poisoning (an adversarial review found it).
    #[test]
    fn a_request_sent_while_its_driver_vm_booted_has_its_deadline_from_the_attach() {
        let t0 = Instant::now();
        let mut session = Session::new(RestartPolicy::default(), ms(100), t0);
        let attach = t0 + ms(440);
        session.progress(attach);
        session.attached(attach);
        let check = Event::HangCheck { pending: true, attached: true, oldest: Some(t0) };
        session.progress(attach + ms(10));
        assert_eq!(session.on(check.clone(), attach + ms(10)), vec![], "its boot is no withholding");
        let deadline = attach + REQUEST_DEADLINE_FACTOR * ms(100);
        session.progress(deadline);
        let fault = Fault::Withheld(REQUEST_DEADLINE_FACTOR * ms(100));
        assert_eq!(session.on(check, deadline), vec![Effect::Retire(fault), Effect::Launch]);
    }

    #[test]
    fn a_driver_vm_still_booting_has_the_boot_deadline() {
        let t0 = Instant::now();
        let mut session = Session::new(RestartPolicy::default(), ms(100), t0);
        let pending_booting = Event::HangCheck { pending: true, attached: false, oldest: None };
        assert_eq!(session.on(pending_booting.clone(), t0 + ms(100)), vec![], "a boot is not a hang");
        assert_eq!(session.on(pending_booting.clone(), t0 + BOOT_DEADLINE - ms(1)), vec![]);
        let hang = Fault::Hang(BOOT_DEADLINE);
        assert_eq!(session.on(pending_booting, t0 + BOOT_DEADLINE), vec![Effect::Retire(hang), Effect::Launch]);
    }

    #[test]
    fn a_driver_vm_that_cannot_start_counts_as_a_fault() {
        let t0 = Instant::now();
        let mut session = session(t0);
        session.on(Event::Fault(exited()), t0 + ms(1000));
        let effects = session.on(Event::LaunchFailed("no vmm".into()), t0 + ms(1001));
        assert_eq!(effects, vec![Effect::ArmTimer(ms(5))], "backs off: the last start was just now");
        assert!(matches!(session.state(), Lifecycle::BackingOff { why: Fault::Exited(w), .. } if w.contains("no vmm")));
        // Starts that keep failing end the device failed.
        let mut now = t0 + ms(1001);
        for _ in 0..20 {
            if session.failed() {
                break;
            }
            now += Duration::from_secs(1);
            session.on(Event::TimerFired, now);
            session.on(Event::LaunchFailed("no vmm".into()), now);
        }
        assert!(session.failed(), "{:?}", session.state());
    }

    /// Drivers that die as they start may be dying of what a predecessor
    /// left in the device: every [`RENEW_AFTER`]th such death in a row
    /// renews the hardware before the next launch; a driver that served
    /// for a while, or one killed as an operator asked, does not count.
    /// Drivers that never attach, each killed for a hang after seconds
    /// (past `stable_after`, and under the fault budget): none blames the
    /// request it withheld, so before, the request was replayed to them
    /// for ever (an adversarial review found it). They fail the device at
    /// the crash-loop limit, which fails what is pending; kills from
    /// outside do not count.
    #[test]
    fn drivers_that_never_attach_fail_the_device_at_the_crash_loop_limit() {
        let t0 = Instant::now();
        let mut session = Session::new(RestartPolicy::default(), ms(500), t0);
        let limit = RestartPolicy::default().crash_loop_limit;
        let mut now = t0;
        let mut failed_at = None;
        for death in 1..=limit + 5 {
            if !matches!(session.state(), Lifecycle::Running { .. }) {
                launch_unattached(&mut session, now);
            }
            now += Duration::from_secs(3);
            let fault = if death == 2 { Fault::Killed } else { Fault::Hang(ms(2000)) };
            let effects = session.on(Event::Fault(fault), now);
            if effects.contains(&Effect::FailPending) {
                failed_at = Some(death);
                break;
            }
            assert!(matches!(session.state(), Lifecycle::Restarting { .. }), "death {death}: {:?}", session.state());
        }
        // The kill an operator asked for (death 2) did not count.
        assert_eq!(failed_at, Some(limit + 1));
        assert!(matches!(session.state(), Lifecycle::Failed { .. }));
    }

    /// A vmm that ends without a report, and not at the reflector's
    /// hand, may have ended itself: a compromised one can, as often as it
    /// likes. Taken for a kill from outside, drivers that did so before
    /// attaching, each living long enough to be restarted at once and
    /// spaced under the fault budget, were restarted for ever, and a
    /// request they held waited for ever (an adversarial review found it).
    #[test]
    fn drivers_that_end_without_a_report_before_attaching_fail_the_device() {
        let t0 = Instant::now();
        let mut session = Session::new(RestartPolicy::default(), ms(500), t0);
        let limit = RestartPolicy::default().crash_loop_limit;
        let mut now = t0;
        let mut failed_at = None;
        for death in 1..=100 {
            if !matches!(session.state(), Lifecycle::Running { .. }) {
                launch_unattached(&mut session, now);
            }
            now += ms(600);
            if session.on(Event::Fault(Fault::Exited(String::new())), now).contains(&Effect::FailPending) {
                failed_at = Some(death);
                break;
            }
        }
        assert_eq!(failed_at, Some(limit), "silent deaths before attaching never failed the device");
    }

    #[test]
    fn drivers_dying_at_their_start_renew_the_hardware_every_third_death() {
        let t0 = Instant::now();
        let mut session = Session::new(RestartPolicy { budget: 100, ..RestartPolicy::default() }, ms(500), t0);
        session.attached(t0);
        let mut now = t0 + ms(1000);
        let panicked = Fault::Exited(r#"{"outcome":"panic"}"#.into());
        let first = session.on(Event::Fault(panicked.clone()), now);
        assert!(!first.contains(&Effect::Renew), "a driver that served is no sign of a broken device: {first:?}");
        let mut renewed = Vec::new();
        // Deaths 1 to 7 of their own doing, then 8 to 10 killed as an
        // operator asked.
        for death in 1..=10u32 {
            // Started when the backoff ended, dead a millisecond later.
            if !matches!(session.state(), Lifecycle::Restarting { .. }) {
                now += Duration::from_secs(1);
                assert_eq!(session.on(Event::TimerFired, now), vec![Effect::Launch]);
            }
            launch(&mut session, now);
            now += ms(1);
            let fault = if death <= 7 { panicked.clone() } else { Fault::Killed };
            if session.on(Event::Fault(fault), now).contains(&Effect::Renew) {
                renewed.push(death);
            }
        }
        assert_eq!(renewed, [3, 6]);
        // A driver that attached and served a while resets the count; ones
        // that live long but never attach (a bring-up that fails slowly)
        // count however long they lived.
        let mut renewed = Vec::new();
        for death in 1..=4u32 {
            if !matches!(session.state(), Lifecycle::Restarting { .. }) {
                now += Duration::from_secs(2);
                session.on(Event::TimerFired, now);
            }
            launch_unattached(&mut session, now);
            if death == 1 {
                session.attached(now);
            }
            now += Duration::from_secs(1);
            if session.on(Event::Fault(panicked.clone()), now).contains(&Effect::Renew) {
                renewed.push(death);
            }
        }
        assert_eq!(renewed, [4], "the attached driver's death counted, or slow ones did not");
    }

    #[test]
    fn kill_and_recover_act_only_where_they_mean_something() {
        let t0 = Instant::now();
        let mut session = session(t0);
        assert_eq!(session.on(Event::Kill, t0), vec![Effect::Kill]);
        assert_eq!(session.on(Event::Recover, t0), vec![], "a running device needs no recovery");
        assert_eq!(session.on(Event::TimerFired, t0), vec![], "no timer is armed while running");
        assert_eq!(session.on(Event::Launched, t0), vec![], "no launch was asked for");
        session.on(Event::Fault(exited()), t0 + ms(1000));
        assert_eq!(session.on(Event::Kill, t0 + ms(1000)), vec![], "nothing runs while restarting");
        assert_eq!(session.on(Event::Fault(exited()), t0 + ms(1000)), vec![], "a gone driver VM cannot fault");
    }
}
