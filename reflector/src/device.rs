//! One device served through a driver VM, whatever its kind: the
//! vhost-user backend and event handler, the driver VMs and their
//! lifecycle ([`Session`]), recovery, spares, hang and cost watches,
//! the client's memory and the metrics plumbing exist once, here. A kind
//! ([`DeviceKind`]: block, net) keeps only its intake, its marshaling, its
//! config space and what recovery means for its requests.
//!
//! Not here: reading client memory (each kind's `marshal`) and judging
//! driver answers (`driver_answers`), the two trust boundaries.

use hardware::shared_eventfd::SharedEventFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::VhostUserBackendMut;

use crate::client_vring::ClientVring;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::channel::Channel;
use crate::client_memory::{self, ClientMemory};
use crate::driver_vms::{DriverLaunch, DriverVms, SpareKind};
use crate::driver_watch::{ResourceWatch, WATCH_PERIOD};
use crate::failover::{Draining, Timeline};
use crate::hw::{Hardware, InterruptRoute};
use crate::metrics::Metrics;
use crate::recovery::{Fault, RecoveryConfig};
use crate::session::{Effect, Event, Session};
use crate::worker::{nonblocking_timer, periodic_timer, signal_used};

#[cfg(test)]
mod fake;
mod stopping;
#[cfg(test)]
mod tests;

/// Epoll data of the device's own event sources, after the client's queues
/// (ids below a kind's queue count are vhost-user-backend's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Source {
    /// The driver VM's completion doorbell.
    Completion = 0,
    /// A driver VM process exited.
    DriverExit,
    /// The hang watchdog timer.
    Hang,
    /// The delayed-restart (and cool-down) timer.
    Restart,
    /// An operator asked to recover a failed device.
    Recover,
    /// An operator (or the chaos command) asked to kill the driver VM:
    /// through the device, which kills by pidfd (a pid read from the
    /// counters may be stale and reused by another process).
    Kill,
    /// The periodic look at the driver VM's costs.
    Watch,
    /// A spare's start ended (`spare_starter`): take it.
    SpareStarted,
}

const SOURCES: [Source; 8] = [
    Source::Completion,
    Source::DriverExit,
    Source::Hang,
    Source::Restart,
    Source::Recover,
    Source::Kill,
    Source::Watch,
    Source::SpareStarted,
];

/// What differs between kinds of device.
pub trait DeviceKind: Send + Sync + 'static {
    /// Queues offered to the client.
    const QUEUES: usize;
    /// Largest queue a client may set up.
    const MAX_QUEUE_SIZE: usize;
    /// Whether every bounce slot is free whenever [`DeviceKind::idle`]
    /// holds, so an idle device may give their pages back (a net device
    /// keeps receive slots with its driver at all times).
    const SLOTS_FREE_WHEN_IDLE: bool = false;
    /// Virtio features offered.
    fn features(&self) -> u64;
    /// vhost-user protocol features offered.
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
    }
    /// The client acknowledged `features`.
    fn acked_features(&mut self, _features: u64) {}
    /// The virtio config space.
    fn config_space(&self) -> Vec<u8>;
    /// The work the device did for its drivers so far, the work granted
    /// it, and whether it waits for a grant ([`crate::hw::WorkAllowance`]),
    /// where the device counts its own.
    fn work(&self) -> Option<crate::driver_watch::DeviceWork> {
        None
    }
    /// Requests (or frames) the driver VM holds: what the hang watch waits
    /// on.
    fn in_driver(&self) -> usize;
    /// A watch period ended (the device's periodic look at its driver VM).
    fn watched(&mut self, _core: &mut DeviceCore) {}
    /// When the request that has been in the current driver VM longest was
    /// sent to it; none for what may wait for ever (a receive buffer).
    fn oldest_in_driver(&self) -> Option<Instant>;
    /// Nothing at all is pending for the client.
    fn idle(&self) -> bool;
    /// The client kicked queue `queue`.
    fn queue_kicked(&mut self, core: &mut DeviceCore, queue: usize, vrings: &[ClientVring]) -> std::io::Result<()>;
    /// The driver VM rang: take its completions (a bad one: `core.fault`).
    fn completions(&mut self, core: &mut DeviceCore, vrings: &[ClientVring]) -> std::io::Result<()>;
    /// The driver VM was killed for `fault` and can no longer run: keep the
    /// answers it gave that pass every check, then settle what it still
    /// held.
    fn retired(&mut self, core: &mut DeviceCore, vrings: &[ClientVring], fault: &Fault);
    /// A new driver VM runs on a new channel generation: give it what it
    /// must have (replays, receive buffers).
    fn launched(&mut self, core: &mut DeviceCore, vrings: &[ClientVring]);
    /// The device failed: complete (or drop) everything pending.
    fn fail_pending(&mut self, core: &mut DeviceCore, vrings: &[ClientVring]);
    /// The client went away (or was cut off): forget its requests.
    fn client_gone(&mut self, core: &mut DeviceCore);
    /// The client stopped queue `queue` (GET_VRING_BASE: its device stops,
    /// is reset, or its guest reboots): nothing the device still holds of
    /// that queue may be written to later, when its memory may be the next
    /// kernel's and its ring another one.
    fn queue_stopped(&mut self, _core: &mut DeviceCore, _queue: usize, _vrings: &[ClientVring]) {}
    /// Chains of queue `queue` the device holds for the current client and
    /// completes later (a block request in a driver VM): a stopped queue
    /// waits for them ([`Device::finish_stopped_queue`]).
    fn held_of_queue(&self, _core: &DeviceCore, _queue: usize) -> usize {
        0
    }
    /// A stopped queue can wait no longer for what the device holds of it:
    /// complete all of it now with an error, so that none of it reaches the
    /// client later. Returns how many of them the driver VM holds.
    fn abandon_queue(&mut self, _core: &mut DeviceCore, _queue: usize, _vrings: &[ClientVring]) -> usize {
        0
    }
    /// Requests of clients that left (or were cut off) the driver VM still
    /// holds, whose effects could outlast them (a block write): the next
    /// client waits for them ([`Device::finish_departed`]).
    fn departed_in_driver(&self, _core: &DeviceCore) -> usize {
        0
    }
}

/// What a device is wired to, whatever its kind.
pub struct DeviceWiring {
    /// The channel into the driver VM.
    pub channel: Channel,
    /// The hardware (quiesced on faults).
    pub hardware: Arc<dyn Hardware>,
    /// Where the hardware's interrupt goes (routed to the driver VM's line 1).
    pub device_interrupt: Arc<InterruptRoute>,
    /// Signalled by the driver VM's completion doorbell (its doorbell 0).
    pub completion_doorbell: SharedEventFd,
    /// Signalled when a driver VM process exits.
    pub driver_exited: EventFd,
    /// Starts driver VMs wired to this device.
    pub launcher: Box<dyn DriverLaunch>,
    /// How long the worker polls for completions after handing requests
    /// to the driver, before it sleeps on the driver's doorbell (see
    /// [`Device::poll_for_completions`]); zero never polls.
    pub poll_window: std::time::Duration,
    /// The memory cap of the driver VMs' cgroup (current and spare
    /// together), bytes, if there is one: for `status`.
    pub memory_cap: Option<u64>,
}

/// Whether polling for completions pays off on this device: a driver
/// whose answers come within the poll window (a null or memory driver)
/// earns credit; one whose device takes longer (the simulated controller's
/// thread, QEMU's models) loses it, and is polled only once in
/// [`PollCredit::PROBE_EVERY`] kicks, to notice when that changes. Polling
/// in vain costs the window in CPU, which on two cores is the device
/// thread's and the driver's time.
#[derive(Debug, Default)]
pub struct PollCredit {
    credit: u32,
    kicks_since_probe: u32,
}

impl PollCredit {
    /// Most credit kept: four misses in a row (each costs two) stop
    /// polling.
    const MAX: u32 = 8;
    /// Kicks between probes while polling has no credit.
    const PROBE_EVERY: u32 = 16;

    /// Whether to poll after this kick.
    pub fn should_poll(&mut self) -> bool {
        if self.credit > 0 {
            return true;
        }
        self.kicks_since_probe += 1;
        if self.kicks_since_probe >= Self::PROBE_EVERY {
            self.kicks_since_probe = 0;
            return true;
        }
        false
    }

    /// Whether the poll found completions within the window.
    pub fn record(&mut self, hit: bool) {
        self.credit = if hit { (self.credit + 1).min(Self::MAX) } else { self.credit.saturating_sub(2) };
    }
}

/// What every kind shares: a kind's methods get it alongside their own
/// state.
pub struct DeviceCore {
    /// The client's tables mapped now (the current one, and older ones
    /// requests in flight hold).
    client_tables: client_memory::TableCount,
    /// See [`DeviceWiring::poll_window`].
    poll_window: std::time::Duration,
    /// Whether polling has been paying off.
    poll_credit: PollCredit,
    /// The device's name.
    pub name: String,
    /// The client negotiated VIRTIO_RING_F_EVENT_IDX.
    pub event_idx: bool,
    /// The client's memory, once its table arrived and was checked: the
    /// only way the device touches it (see [`ClientMemory`]). Dropped when
    /// the client is cut off or leaves, so that its memory is unmapped
    /// (what still reaches it, a DMA window, holds a clone and with it the
    /// SIGBUS registration).
    pub memory: Option<ClientMemory>,
    /// Which client connection this is: answers for an earlier one are
    /// dropped, not written into the new client's memory.
    pub client: u64,
    /// The channel into the driver VM.
    pub channel: Channel,
    hardware: Arc<dyn Hardware>,
    /// The current driver VM and its spare.
    pub drivers: DriverVms,
    /// The driver VMs' lifecycle (sans-IO): what to do about each event.
    pub session: Session,
    /// The device's counters.
    pub metrics: Arc<Metrics>,
    completion_doorbell: SharedEventFd,
    driver_exited: EventFd,
    hang_timer: TimerFd,
    hang_armed: bool,
    /// How often the hang watch looks (a quarter of the deadline).
    hang_period: Duration,
    /// The longest a stopped queue waits for what the device holds of it
    /// ([`Device::finish_stopped_queue`]).
    stop_bound: Duration,
    restart_timer: TimerFd,
    /// What the driver VM costs, judged once per `WATCH_PERIOD`.
    watch: ResourceWatch,
    watch_timer: TimerFd,
    /// Doorbell rings and completions from driver VMs, for `watch`.
    rings: u64,
    answers: u64,
    /// Watch periods in a row with nothing in flight and no answer, and
    /// the answers counted at the last one (`release_idle_slots`).
    idle_periods: u32,
    answers_seen: u64,
    /// Watch periods so far (`RSS_PERIODS`).
    watch_ticks: u32,
    /// The watch runs every `IDLE_WATCH_PERIOD` (the device is idle).
    watch_slow: bool,
    recover: EventFd,
    kill: EventFd,
    /// When the client started waiting on a recovery: the fault, or the
    /// first request after it if none was pending at the fault.
    fault_at: Option<Instant>,
    /// A fault happened with nothing pending; the stall clock starts at the
    /// next request.
    fault_idle: bool,
    /// The current driver VM has attached to its channel generation.
    attached: bool,
    /// The failover under way, for its breakdown (`failover`).
    failover: Option<Timeline>,
    /// The failover past its first completion, until the last request it
    /// caught is answered (its drain phase).
    draining: Option<Draining>,
    /// When the reflector last sent its driver VM a SIGKILL.
    kill_sent: Option<Instant>,
    /// A fault a kind reported, handled once the kind's method returns.
    reported: Option<Fault>,
    /// Why the client is to be cut off, likewise.
    cut: Option<String>,
    /// Why the connected client was cut off: it is refused any new memory
    /// table (which ends its connection) until it reconnects.
    cut_client: Option<String>,
    /// Ends the connected client's connection.
    connection: Option<vhost_user_backend::ShutdownHandle>,
    /// Requests were published to a driver VM that sleeps: it is woken at
    /// the end of the event ([`DeviceCore::wake_sleeping_driver`]).
    wake_pending: bool,
    /// Notifications the client could not be sent, and events whose
    /// handling failed, for the log (a client can cause either at every
    /// kick).
    notify_failures: crate::hw::LogEvery,
    event_failures: crate::hw::LogEvery,
    /// The current connection's queues, as its worker's last event gave
    /// them ([`VhostUserBackendMut::stop_vring`] is not given them).
    vrings: Vec<ClientVring>,
}

impl DeviceCore {
    /// Reports a driver VM fault; the device handles it when the kind's
    /// method returns (the kind stops using the driver VM at once).
    pub fn fault(&mut self, fault: Fault) {
        self.reported.get_or_insert(fault);
    }

    /// Stops serving the current client for good (it must reconnect): its
    /// memory faulted, or its queue is broken. Only it suffers.
    pub fn cut_off(&mut self, why: &str) {
        self.cut.get_or_insert_with(|| why.to_owned());
    }

    /// Puts chain `head` in the client's used ring with `len` bytes
    /// written. A ring that cannot take it (a head past the queue, a used
    /// ring past the client's memory) is the client's: it is cut off,
    /// once, instead of a log line per chain it sends.
    pub fn add_used(&mut self, vring: &ClientVring, memory: &GuestMemoryMmap, head: u16, len: u32) {
        if let Err(error) = crate::worker::add_used(vring, memory, head, len) {
            self.metrics.malformed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(device = %self.name, head, %error, "cannot put a chain in the client's used ring");
            self.cut_off("its used ring cannot take the chains it sent");
        }
    }

    /// Whether the client's queue can be served; if not
    /// ([`crate::worker::broken_queue`]), the client is cut off. Checked
    /// before every pass over a queue.
    pub fn queue_servable(&mut self, vring: &ClientVring, memory: &GuestMemoryMmap) -> bool {
        match crate::worker::broken_queue(vring, memory) {
            None => true,
            Some(why) => {
                self.metrics.malformed.fetch_add(1, Ordering::Relaxed);
                self.cut_off(why);
                false
            }
        }
    }

    /// The driver VM answered work it had been given: it may spend CPU
    /// this watch period (a kind decides which answers are work: a net
    /// driver's receive buffers answered with an error are not).
    pub fn note_busy(&mut self) {
        self.watch.note_busy();
    }

    /// A pass over a queue took no chain after the ring reported more
    /// ([`crate::worker::STUCK_QUEUE`]): the client is cut off, unless it
    /// stopped the queue meanwhile (GET_VRING_BASE), which ends the pass
    /// quietly. Whether it was cut off.
    pub fn stuck_pass(&mut self, vring: &ClientVring) -> bool {
        let stuck = crate::worker::queue_ready(vring);
        if stuck {
            self.metrics.malformed.fetch_add(1, Ordering::Relaxed);
            self.cut_off(crate::worker::STUCK_QUEUE);
        }
        stuck
    }

    /// Asks the client not to kick while the device takes its chains
    /// (EVENT_IDX); false, and the client cut off, if its used ring cannot
    /// take the request (its notification field lies outside its memory).
    pub fn quiet_client(&mut self, vring: &ClientVring, memory: &GuestMemoryMmap) -> bool {
        let quiet = crate::worker::disable_notification(vring, memory).is_ok();
        if !quiet {
            self.cut_off("its used ring's notification field cannot be written");
        }
        quiet
    }

    /// Asks the client to kick again (EVENT_IDX); whether more chains came
    /// meanwhile. A used ring that cannot take the request cuts the client
    /// off (false): before, the error left the requests the event had
    /// taken unpublished, and the driver was blamed for them.
    pub fn rearm_client(&mut self, vring: &ClientVring, memory: &GuestMemoryMmap) -> bool {
        match crate::worker::enable_notification(vring, memory) {
            Ok(more) => more,
            Err(_) => {
                self.cut_off("its used ring's notification field cannot be written");
                false
            }
        }
    }

    /// Whether touching the client's memory has faulted.
    pub fn client_memory_poisoned(&self) -> bool {
        self.memory.as_ref().is_some_and(ClientMemory::poisoned)
    }

    /// The driver VM's new completions; None (reported as a fault, unless
    /// `salvaging` a dead driver VM's) if its completion ring broke the
    /// protocol.
    pub fn take_completions(&mut self, salvaging: bool) -> Option<Vec<guest_abi::channel::CompletionEntry>> {
        match self.channel.take_completions() {
            Ok(completions) => {
                if !salvaging {
                    self.answers = self.answers.wrapping_add(completions.len() as u64);
                }
                Some(completions)
            }
            Err(violation) => {
                if !salvaging {
                    self.fault(Fault::Violation(violation.to_string()));
                }
                None
            }
        }
    }

    /// A request completed: the driver VM is alive and making progress.
    /// The first completion after a fault ends the client's stall; then
    /// the spare the recovery used up is replaced.
    pub fn progress(&mut self) {
        let now = Instant::now();
        self.session.progress(now);
        self.note_driver_marks(now);
        if let Some(breakdown) = self.failover.take().and_then(|timeline| timeline.finish(now)) {
            self.draining = Some(Draining::new(breakdown, now));
        }
        if let Some(fault_at) = self.fault_at.take() {
            let stall = now.duration_since(fault_at).as_micros() as u64;
            self.metrics.record_stall(stall);
            tracing::info!(device = %self.name, stall_us = stall, "recovered: first completion after the fault");
        }
        self.drivers.launch_wanted_spare();
    }

    /// Whether a failover waits for the last request it caught to be
    /// answered ([`DeviceCore::drained`]).
    pub fn draining(&self) -> bool {
        self.draining.is_some()
    }

    /// The last request a failover caught has been answered to the client
    /// (a kind calls this once it has delivered the answer; a net device,
    /// which replays nothing, at its first completion): the failover's
    /// breakdown is complete.
    pub fn drained(&mut self) {
        if let Some(draining) = self.draining.take() {
            self.metrics.record_failover(draining.drained(Instant::now()));
        }
    }

    /// Takes the current driver's marks of its start (it rings once for
    /// each): its attach starts its hang deadline, and both time the
    /// failover under way.
    fn note_driver_marks(&mut self, now: Instant) {
        if self.attached {
            return;
        }
        let mark = self.channel.driver_mark();
        if mark == Some(guest_abi::channel::driver_state::READY) {
            self.attached = true;
            self.session.progress(now);
            self.session.attached(now);
        }
        if let Some(timeline) = self.failover.as_mut() {
            match mark {
                Some(guest_abi::channel::driver_state::OPENED) => timeline.opened(now),
                Some(guest_abi::channel::driver_state::READY) => timeline.attached(now),
                _ => {}
            }
        }
    }

    /// Whether the current driver VM has attached to its channel: one that
    /// has not has taken no request, so its death is no evidence against
    /// any (poison requests).
    pub fn driver_attached(&mut self) -> bool {
        self.note_driver_marks(Instant::now());
        self.attached
    }

    /// A client request arrived: if a fault found nothing pending, the
    /// client's stall starts now.
    pub fn request_arrived(&mut self) {
        self.set_watch_period(false);
        if std::mem::take(&mut self.fault_idle) {
            self.fault_at = Some(Instant::now());
        }
    }

    /// Watches the driver VM every `WATCH_PERIOD`, or every
    /// `IDLE_WATCH_PERIOD` while the device is idle (`slow`).
    fn set_watch_period(&mut self, slow: bool) {
        if self.watch_slow == slow {
            return;
        }
        let period = if slow { IDLE_WATCH_PERIOD } else { WATCH_PERIOD };
        match self.watch_timer.reset(period, Some(period)) {
            Ok(()) => self.watch_slow = slow,
            Err(error) => tracing::warn!(device = %self.name, %error, "cannot change the watch period"),
        }
    }

    /// Publishes new requests to the driver VM. One that sleeps is woken
    /// by [`DeviceCore::wake_sleeping_driver`] once the worker has told
    /// the client about its used buffers: a woken driver VM's vCPU thread
    /// may run on this CPU and poll there for its window, and the client's
    /// signal behind it waited that long (two QEMU guests' ping: each
    /// delivered frame's signal came 0.5-0.9 ms after the frame).
    pub fn publish(&mut self) {
        self.wake_pending |= self.channel.publish();
    }

    /// Wakes the driver VM if requests were published while it slept.
    pub fn wake_sleeping_driver(&mut self) {
        if std::mem::take(&mut self.wake_pending) {
            // The vmm holds the line too: never a write (`shared_eventfd`).
            if let Err(error) = self.drivers.request_interrupt().signal() {
                tracing::warn!(device = %self.name, %error, "cannot wake the driver VM");
            }
        }
    }

    /// Watches for a hang while `in_driver` requests are in the driver VM.
    pub fn arm_hang_watch(&mut self, in_driver: usize) {
        if self.hang_armed || in_driver == 0 || !self.session.running() {
            return;
        }
        self.session.progress(Instant::now());
        if self.hang_timer.reset(self.hang_period, Some(self.hang_period)).is_ok() {
            self.hang_armed = true;
        }
    }

    fn disarm_hang_watch(&mut self) {
        if self.hang_armed {
            let _ = self.hang_timer.clear();
            self.hang_armed = false;
        }
    }

    fn arm_restart_timer(&mut self, delay: Duration) {
        if let Err(error) = self.restart_timer.reset(delay.max(Duration::from_micros(1)), None) {
            tracing::error!(device = %self.name, %error, "cannot arm the restart timer");
        }
    }
}

/// Watch periods (seconds) a device must stay idle before its bounce
/// slots' memory is released: long enough that a device in use between
/// bursts keeps its pages, short enough that an idle fleet is small soon.
const IDLE_RELEASE_PERIODS: u32 = 5;

/// The watch period of an idle device (from `IDLE_RELEASE_PERIODS` on,
/// until its next request): each watch wakes the device's worker and reads
/// /proc, and a fleet of 100 idle devices spent 1.9 % of a core on its
/// watches at one a second. A driver VM that spins while idle is then
/// caught within this (its cgroup holds it to a core meanwhile).
const IDLE_WATCH_PERIOD: Duration = Duration::from_secs(5);

/// Watch periods between samples of a driver VM's resident memory.
const RSS_PERIODS: u32 = 10;

/// A device of kind `K`.
pub struct Device<K> {
    core: DeviceCore,
    kind: K,
}

impl<K: DeviceKind> Device<K> {
    /// A device of `kind` served through `wiring`; starts its first driver
    /// VM (and a spare, if configured).
    pub fn new(name: &str, kind: K, wiring: DeviceWiring, recovery: RecoveryConfig) -> std::io::Result<Self> {
        let drivers = DriverVms::start(wiring.launcher, wiring.device_interrupt, recovery.spare)?;
        let new_eventfd = || EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK | libc::EFD_CLOEXEC);
        let core = DeviceCore {
            name: name.to_owned(),
            event_idx: false,
            memory: None,
            client_tables: client_memory::TableCount::default(),
            client: 0,
            channel: wiring.channel,
            hardware: wiring.hardware,
            drivers,
            session: Session::new(recovery.policy, recovery.hang_deadline, Instant::now()),
            metrics: Arc::new(Metrics::default()),
            completion_doorbell: wiring.completion_doorbell,
            driver_exited: wiring.driver_exited,
            hang_timer: nonblocking_timer()?,
            hang_armed: false,
            hang_period: recovery.hang_deadline / 4,
            stop_bound: stopping::stop_bound(recovery.hang_deadline),
            restart_timer: nonblocking_timer()?,
            watch: ResourceWatch::default(),
            watch_timer: periodic_timer(WATCH_PERIOD)?,
            rings: 0,
            answers: 0,
            idle_periods: 0,
            answers_seen: 0,
            watch_ticks: 0,
            watch_slow: false,
            recover: new_eventfd()?,
            kill: new_eventfd()?,
            fault_at: None,
            fault_idle: false,
            attached: false,
            failover: None,
            draining: None,
            kill_sent: None,
            reported: None,
            cut: None,
            cut_client: None,
            connection: None,
            wake_pending: false,
            notify_failures: crate::hw::LogEvery::default(),
            event_failures: crate::hw::LogEvery::default(),
            vrings: Vec::new(),
            poll_window: wiring.poll_window,
            poll_credit: PollCredit::default(),
        };
        core.metrics.memory_cap_bytes.store(wiring.memory_cap.unwrap_or(0), Ordering::Relaxed);
        let mut device = Device { core, kind };
        device.kind.launched(&mut device.core, &[]);
        device.publish_state();
        Ok(device)
    }

    /// The kind's own state.
    pub fn kind(&self) -> &K {
        &self.kind
    }

    /// An eventfd that, when written, makes a failed device try a new
    /// driver VM at once (`reflector recover`).
    pub fn recover_trigger(&self) -> std::io::Result<EventFd> {
        self.core.recover.try_clone()
    }

    /// An eventfd that, when written, makes the device SIGKILL its current
    /// driver VM through its pidfd (`reflector kill`, chaos).
    pub fn kill_trigger(&self) -> std::io::Result<EventFd> {
        self.core.kill.try_clone()
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.core.metrics.clone()
    }

    /// The current driver VM's pid, if one runs.
    pub fn driver_pid(&self) -> Option<libc::pid_t> {
        self.core.drivers.current_pid()
    }

    /// Kills the driver VMs and the hardware's process for good, without
    /// waiting for them (the reflector is stopping every device at once).
    pub fn stop(&mut self) {
        self.core.drivers.stop();
        self.core.hardware.stop();
    }

    /// [`Device::stop`], then waits (bounded) for what it killed and takes
    /// down what they ran in. Again, it finds nothing left to do.
    pub fn shutdown(&mut self) {
        self.stop();
        self.core.drivers.shutdown();
        self.core.hardware.shut_down();
    }

    /// The file descriptors the vhost-user worker must watch, with their
    /// event ids.
    pub fn listeners(&self) -> Vec<(std::os::fd::RawFd, u16)> {
        use std::os::fd::AsRawFd;
        let core = &self.core;
        SOURCES
            .iter()
            .map(|source| {
                let fd = match source {
                    Source::Completion => core.completion_doorbell.as_raw_fd(),
                    Source::DriverExit => core.driver_exited.as_raw_fd(),
                    Source::Hang => core.hang_timer.as_raw_fd(),
                    Source::Restart => core.restart_timer.as_raw_fd(),
                    Source::Recover => core.recover.as_raw_fd(),
                    Source::Kill => core.kill.as_raw_fd(),
                    Source::Watch => core.watch_timer.as_raw_fd(),
                    Source::SpareStarted => core.drivers.spare_event().as_raw_fd(),
                };
                (fd, Self::event_id(*source))
            })
            .collect()
    }

    /// The epoll data of `source`.
    pub fn event_id(source: Source) -> u16 {
        K::QUEUES as u16 + 1 + source as u16
    }

    fn source_of(event: u16) -> Option<Source> {
        let index = event.checked_sub(K::QUEUES as u16 + 1)?;
        SOURCES.get(usize::from(index)).copied()
    }

    /// Forgets a client whose connection ended: its queues are gone, so
    /// what is still in the driver VM completes into nothing; the next
    /// client starts afresh.
    pub fn client_gone(&mut self) {
        self.forget_client();
        self.core.cut_client = None;
        self.core.connection = None;
        // They hold the client's memory and descriptors.
        self.core.vrings.clear();
        self.finish_departed();
        client_memory::reap_retired(&self.core.client_tables);
    }

    /// A client connected; `connection` ends its connection, which the
    /// device does when it cuts the client off.
    pub fn client_connected(&mut self, connection: vhost_user_backend::ShutdownHandle) {
        // The connection's handler runs before this is told: a client cut
        // off meanwhile found no handle to end its connection.
        if self.core.cut_client.is_some() {
            connection.shutdown();
        }
        self.core.connection = Some(connection);
    }

    /// Forgets the current client (it left or was cut off).
    fn forget_client(&mut self) {
        tracing::trace!(device = %self.core.name, "client gone");
        self.core.memory = None;
        self.core.client += 1;
        self.kind.client_gone(&mut self.core);
    }

    /// Mirrors the state operators see (`reflector status`).
    fn publish_state(&self) {
        let metrics = &self.core.metrics;
        metrics.state.store(self.core.session.state().index(), Ordering::Relaxed);
        metrics.driver_pid.store(self.driver_pid().unwrap_or(0) as u64, Ordering::Relaxed);
        let spare = self.core.drivers.spare_pid();
        metrics.spare_pid.store(spare.unwrap_or(0) as u64, Ordering::Relaxed);
        if spare.is_none() {
            metrics.spare_rss_kib.store(0, Ordering::Relaxed);
            metrics.spare_own_kib.store(0, Ordering::Relaxed);
        }
        metrics.in_flight.store(self.kind.in_driver() as u64, Ordering::Relaxed);
    }

    /// Feeds `event` to the session and carries out its effects, in order.
    fn handle(&mut self, vrings: &[ClientVring], event: Event) {
        for effect in self.core.session.on(event, Instant::now()) {
            match effect {
                Effect::Retire(fault) => self.retire(vrings, &fault),
                Effect::Launch => self.launch(vrings),
                Effect::ArmTimer(delay) => {
                    if !self.core.session.failed() {
                        let delay_ms = delay.as_millis() as u64;
                        tracing::info!(device = %self.core.name, delay_ms, "restart delayed (backoff)");
                    }
                    if let Some(timeline) = self.core.failover.as_mut() {
                        timeline.delayed();
                    }
                    self.core.arm_restart_timer(delay);
                }
                Effect::FailPending => {
                    tracing::error!(device = %self.core.name, "too many driver VM faults: the device fails its requests until the cool-down ends or an operator recovers it");
                    self.kind.fail_pending(&mut self.core, vrings);
                }
                Effect::Kill => {
                    self.core.kill_sent = Some(Instant::now());
                    self.core.drivers.kill_current();
                }
                Effect::Renew => self.core.hardware.renew(),
            }
        }
        self.publish_state();
    }

    /// Kills the faulty driver VM and waits until it cannot run, quiesces
    /// the hardware, and lets the kind keep what it finished correctly.
    fn retire(&mut self, vrings: &[ClientVring], fault: &Fault) {
        let detected = Instant::now();
        let core = &mut self.core;
        let pid = core.drivers.current_pid();
        // A hung driver VM is first asked where it is; a crashed one said
        // so in its exit report.
        let report = core.drivers.drop_current(matches!(fault, Fault::Hang(_) | Fault::Withheld(_)));
        let report = report.as_deref().or(match fault {
            Fault::Exited(report) | Fault::OutOfMemory(report) => Some(report.as_str()),
            _ => None,
        });
        let site = report.and_then(crate::supervisor::crash_site).unwrap_or_default();
        tracing::warn!(device = %core.name, driver_vm = %core.drivers.name(), ?pid, kind = fault.kind(), %fault, location = %site, "driver VM fault");
        if matches!(fault, Fault::Hang(_) | Fault::Withheld(_)) {
            tracing::warn!(device = %core.name, report = report.unwrap_or("none"), "where the hung driver VM was");
        }
        core.metrics.faults.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last) = core.metrics.last_fault.lock() {
            *last = format!("{}: {fault}", fault.kind());
        }
        if let Ok(mut last) = core.metrics.last_fault_location.lock() {
            *last = site;
        }
        // Nothing the dead driver queued may run once the replay reuses its
        // bounce slots.
        core.hardware.quiesce();
        core.disarm_hang_watch();
        // The stall the client sees; with no client there is none.
        let waiting = core.memory.is_some() && !self.kind.idle();
        if core.fault_at.is_none() && core.memory.is_some() {
            if waiting {
                core.fault_at = Some(Instant::now());
            } else {
                core.fault_idle = true;
            }
        }
        // The failover is timed when a client waits on it (a later fault
        // during it starts a new one: its phases are the last attempt's).
        if let Some(draining) = core.draining.take() {
            core.metrics.record_failover(draining.abandoned());
        }
        // Taken whether or not a client waits: left, an operator's kill of
        // an idle device had every later end without a report taken for
        // one (an adversarial review found it).
        let kill_sent = core.kill_sent.take();
        core.failover = waiting.then(|| {
            let mut timeline = Timeline::new(detected, kill_sent);
            timeline.retired(Instant::now());
            timeline
        });
        self.kind.retired(&mut self.core, vrings, fault);
        // A kind's own fault while salvaging is the same fault.
        self.core.reported = None;
    }

    /// Starts a new driver VM on a new channel generation and lets the kind
    /// give it what it must have.
    fn launch(&mut self, vrings: &[ClientVring]) {
        let core = &mut self.core;
        let generation = core.channel.reset();
        core.attached = false;
        // The old driver VM can no longer run (`drop_current` waited).
        core.hardware.resume();
        match core.drivers.replace() {
            Ok((pid, started)) => {
                let started = started.map_or("cold", SpareKind::name);
                tracing::info!(device = %core.name, pid, generation, %started, "driver VM restarted");
                if let Some(timeline) = core.failover.as_mut() {
                    timeline.replaced(Instant::now());
                }
                // The new driver VM's memory is sampled at the next watch.
                core.metrics.driver_rss_kib.store(0, Ordering::Relaxed);
                core.session.on(Event::Launched, Instant::now());
                // Observers that see the new restart count must also see
                // the new driver VM (the chaos command kills by pid).
                self.publish_state();
                self.core.metrics.restarts.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) if core.drivers.stopped() => {
                // Stopping: its requests stay unanswered (the client sees
                // the device go, not an I/O error), and no timer restarts.
                tracing::info!(device = %core.name, %error, "no restart");
                return;
            }
            Err(error) => {
                tracing::error!(device = %core.name, %error, "cannot start a driver VM");
                self.handle(vrings, Event::LaunchFailed(error.to_string()));
                return;
            }
        }
        self.kind.launched(&mut self.core, vrings);
        self.core.publish();
        self.core.arm_hang_watch(self.kind.in_driver());
        if self.kind.in_driver() == 0 {
            self.core.drivers.launch_wanted_spare();
        }
    }

    /// Handles what a kind's method reported: a fault, a client to cut off.
    fn settle(&mut self, vrings: &[ClientVring]) {
        if let Some(fault) = self.core.reported.take() {
            if matches!(fault, Fault::Violation(_)) {
                self.core.metrics.violations.fetch_add(1, Ordering::Relaxed);
            }
            self.handle(vrings, Event::Fault(fault));
        }
        if self.core.cut_client.is_none() && vrings.iter().any(ClientVring::kick_refused) {
            self.core.metrics.malformed.fetch_add(1, Ordering::Relaxed);
            self.core.cut_off(&format!(
                "it gave a kick whose reads do not take its whole count ({})",
                crate::client_vring::PARTIAL_READ_KICK
            ));
        }
        if self.core.memory.is_some() && self.core.client_memory_poisoned() {
            self.core.metrics.client_memory_faults.fetch_add(1, Ordering::Relaxed);
            self.core.cut_off("its memory faulted: the file behind its RAM shrank or ran out of pages");
        }
        if let Some(why) = self.core.cut.take() {
            tracing::error!(device = %self.core.name, why, "no longer serving this client; it must reconnect");
            self.forget_client();
            self.core.cut_client = Some(why);
            // Ended, so that the client cannot go on sending messages the
            // handler acts on; until it is, every new table is refused.
            if let Some(connection) = self.core.connection.take() {
                connection.shutdown();
            }
        }
    }

    /// Gives the bounce slots' memory back once the device has been idle
    /// for [`IDLE_RELEASE_PERIODS`] watch periods in a row: a fleet of idle
    /// devices then holds only the channel's header and rings (each slot
    /// used once otherwise stays resident: 512 KiB per device after a
    /// short verified load, most of the reflector's resident memory with
    /// 100 devices). The next request faults the pages back in.
    fn release_idle_slots(&mut self) {
        let core = &mut self.core;
        let quiet = core.answers == core.answers_seen && self.kind.idle() && self.kind.in_driver() == 0;
        core.answers_seen = core.answers;
        if !K::SLOTS_FREE_WHEN_IDLE || !quiet {
            core.idle_periods = 0;
            core.set_watch_period(false);
            return;
        }
        core.idle_periods = core.idle_periods.saturating_add(1);
        if core.idle_periods == IDLE_RELEASE_PERIODS {
            core.set_watch_period(true);
            // A device reaching the slots through an IOMMU (VFIO) pinned
            // them: released, the host would get fresh pages and the
            // device keep the old (an adversarial review found it).
            if core.channel.memory().pinned() {
                return;
            }
            match core.channel.release_bounce_slots() {
                Ok(()) => tracing::debug!(device = %core.name, "idle: bounce slots' memory released"),
                Err(error) => tracing::warn!(device = %core.name, %error, "cannot release the idle bounce slots"),
            }
        }
    }

    /// Judges what the current driver VM cost over the last period.
    fn watch_driver(&mut self, vrings: &[ClientVring]) {
        self.release_idle_slots();
        self.kind.watched(&mut self.core);
        let core = &mut self.core;
        if !core.session.running() {
            return;
        }
        // A standby wanted since the start (an idle device completes no
        // request to start it), or a spare that failed; never during a
        // recovery, whose first completion starts the next spare.
        if core.fault_at.is_none() && core.failover.is_none() {
            core.drivers.launch_wanted_spare();
        }
        let Some(pid) = core.drivers.current_pid() else { return };
        // Resident memory changes slowly: sampled every RSS_PERIODS (each
        // /proc read costs the worker a wake-up's worth; an idle fleet of
        // 100 devices spent 1.8 % of a core on its watches).
        core.watch_ticks = core.watch_ticks.wrapping_add(1);
        let unsampled = |kib: &std::sync::atomic::AtomicU64| kib.load(Ordering::Relaxed) == 0;
        let new_spare = core.drivers.spare_pid().is_some() && unsampled(&core.metrics.spare_rss_kib);
        if core.watch_ticks % RSS_PERIODS == 1 || unsampled(&core.metrics.driver_rss_kib) || new_spare {
            if let Ok(memory) = crate::driver_watch::process_memory_kib(pid) {
                core.metrics.driver_rss_kib.store(memory.resident, Ordering::Relaxed);
                core.metrics.driver_own_kib.store(memory.own, Ordering::Relaxed);
            }
            let spare = core.drivers.spare_pid().and_then(|pid| crate::driver_watch::process_memory_kib(pid).ok());
            core.metrics.spare_rss_kib.store(spare.as_ref().map_or(0, |m| m.resident), Ordering::Relaxed);
            core.metrics.spare_own_kib.store(spare.as_ref().map_or(0, |m| m.own), Ordering::Relaxed);
        }
        if self.kind.in_driver() > 0 {
            core.watch.note_busy();
        }
        let Some(cpu) = core.drivers.current_cpu_time() else { return };
        if let Some(abuse) = core.watch.look(pid, cpu, core.rings, core.answers, self.kind.work()) {
            core.metrics.abuses.fetch_add(1, Ordering::Relaxed);
            self.handle(vrings, Event::Fault(Fault::Abuse(abuse.to_string())));
        }
    }

    /// After handing requests to the driver: polls the completion ring for
    /// up to the poll window, with the driver told not to ring (a doorbell
    /// from a driver VM is an exit, and waking this worker a cross-CPU
    /// wake-up). Returns at the first completions, taken, so the client
    /// hears of them at once; or when the window ends, after telling the
    /// driver to ring again and looking once more (a completion published
    /// meanwhile was not rung for).
    fn poll_for_completions(&mut self, vrings: &[ClientVring]) -> std::io::Result<()> {
        let window = self.core.poll_window;
        if window.is_zero() || self.kind.in_driver() == 0 || !self.core.session.running() {
            return Ok(());
        }
        if !self.core.poll_credit.should_poll() {
            return Ok(());
        }
        self.core.channel.set_host_waiting(false);
        let start = Instant::now();
        while !self.core.channel.completions_pending() && start.elapsed() < window {
            // Yielding, not spinning: the threads this worker waits for
            // (the device's, the client's) may be runnable on this very
            // core, and a spin would hold it from them until preempted.
            std::thread::yield_now();
        }
        let hit = self.core.channel.completions_pending();
        self.core.poll_credit.record(hit);
        self.core.channel.set_host_waiting(true);
        if hit || self.core.channel.completions_pending() {
            return self.kind.completions(&mut self.core, vrings);
        }
        Ok(())
    }

    /// What follows every event: faults and cut-offs it brought are
    /// handled, the state is published, the client told of its used
    /// chains and a sleeping driver VM of new requests. A failure is
    /// logged, not returned: returned, it would end vhost-user-backend's
    /// worker loop for good, and with it the connection's I/O.
    fn after_event(&mut self, vrings: &[ClientVring], device_event: u16, result: std::io::Result<()>) {
        self.settle(vrings);
        self.publish_state();
        for vring in vrings {
            if let Err(error) = signal_used(vring, self.core.memory.as_deref()) {
                if let Some(failures) = self.core.notify_failures.note() {
                    tracing::warn!(device = %self.core.name, %error, failures, "cannot notify the client");
                }
            }
        }
        self.core.wake_sleeping_driver();
        if let Err(error) = result {
            if let Some(failures) = self.core.event_failures.note() {
                tracing::warn!(device = %self.core.name, device_event, %error, failures, "event handling failed");
            }
        }
    }

    /// Handles what `source` says. Its timer or eventfd is read first, and
    /// one that had nothing to read says nothing: a stopped queue's drain
    /// ([`Device::finish_stopped_queue`]) may have handled the event while
    /// the worker already held it in its batch, and handled again, a kill
    /// killed the driver VM that had just replaced the one killed.
    fn on_source(&mut self, source: Source, vrings: &[ClientVring]) -> std::io::Result<()> {
        match source {
            Source::Completion => {
                // The vmm holds the doorbell too (its ioeventfd), and may have
                // drained it: never a plain read (`shared_eventfd`).
                if let Ok(rings @ 1..) = self.core.completion_doorbell.take() {
                    self.core.rings = self.core.rings.wrapping_add(rings);
                    self.core.metrics.doorbells.fetch_add(rings, Ordering::Relaxed);
                }
                if !self.core.session.running() {
                    return Ok(());
                }
                self.core.note_driver_marks(Instant::now());
                self.kind.completions(&mut self.core, vrings)
            }
            Source::DriverExit => {
                let _ = self.core.driver_exited.read();
                if let Some((report, capped)) = self.core.drivers.exited() {
                    let killed = self.core.kill_sent.is_some();
                    self.handle(vrings, Event::Fault(Fault::of_exit(report, capped, killed)));
                }
                Ok(())
            }
            Source::Hang => {
                if self.core.hang_timer.wait().is_err() {
                    return Ok(());
                }
                if self.kind.in_driver() == 0 || !self.core.session.running() {
                    self.core.disarm_hang_watch();
                    return Ok(());
                }
                let attached = self.core.driver_attached();
                let oldest = self.kind.oldest_in_driver();
                self.handle(vrings, Event::HangCheck { pending: true, attached, oldest });
                Ok(())
            }
            Source::Restart => {
                if self.core.restart_timer.wait().is_err() {
                    return Ok(());
                }
                self.handle(vrings, Event::TimerFired);
                Ok(())
            }
            Source::Recover => {
                if self.core.recover.read().is_err() {
                    return Ok(());
                }
                tracing::info!(device = %self.core.name, "recovery requested by an operator");
                self.handle(vrings, Event::Recover);
                Ok(())
            }
            Source::Kill => {
                if self.core.kill.read().is_err() {
                    return Ok(());
                }
                self.handle(vrings, Event::Kill);
                Ok(())
            }
            Source::Watch => {
                if self.core.watch_timer.wait().is_err() {
                    return Ok(());
                }
                client_memory::reap_retired(&self.core.client_tables);
                self.watch_driver(vrings);
                Ok(())
            }
            Source::SpareStarted => {
                self.core.drivers.collect_spare();
                self.publish_state();
                Ok(())
            }
        }
    }
}

impl<K: DeviceKind> VhostUserBackendMut for Device<K> {
    type Bitmap = ();
    type Vring = ClientVring;

    fn num_queues(&self) -> usize {
        K::QUEUES
    }

    fn max_queue_size(&self) -> usize {
        K::MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        self.kind.features()
    }

    fn acked_features(&mut self, features: u64) {
        self.kind.acked_features(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.kind.protocol_features()
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.core.event_idx = enabled;
    }

    /// GET_VRING_BASE. The client takes the ring back when this returns,
    /// so every request taken from it completes first.
    fn stop_vring(&mut self, queue_index: u32) -> std::io::Result<()> {
        let vrings = std::mem::take(&mut self.core.vrings);
        self.kind.queue_stopped(&mut self.core, queue_index as usize, &vrings);
        self.finish_stopped_queue(queue_index as usize, &vrings);
        self.core.vrings = vrings;
        Ok(())
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        crate::worker::config_read(&self.kind.config_space(), offset, size)
    }

    /// Each vhost-user worker gets an exit event, so that when a client
    /// disconnects the worker can be stopped and a new connection served.
    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(error) => {
                tracing::error!(device = %self.core.name, %error, "cannot create a worker exit event");
                None
            }
        }
    }

    fn update_memory(&mut self, memory: GuestMemoryAtomic<GuestMemoryMmap>) -> std::io::Result<()> {
        tracing::trace!(device = %self.core.name, "client memory table");
        // The old table leaves vhost-user-backend's view before this is
        // called; dropping the device's snapshot of it unmaps it, and then
        // its ranges leave the guard (they would name whatever is mapped
        // there next).
        self.core.memory = None;
        if let Some(why) = &self.core.cut_client {
            return Err(std::io::Error::other(format!("the client was cut off ({why}): it must reconnect")));
        }
        // The new table, as the handler has just mapped it: nothing of the
        // device has touched it (it reads only its checked snapshot).
        self.core.memory =
            Some(client_memory::accept(&self.core.name, memory.memory().into_inner(), &self.core.client_tables)?);
        Ok(())
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[ClientVring],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        tracing::trace!(device = %self.core.name, device_event, memory = self.core.memory.is_some(), "worker event");
        let known =
            self.core.vrings.len() == vrings.len() && self.core.vrings.iter().zip(vrings).all(|(a, b)| a.same(b));
        if !known {
            self.core.vrings = vrings.to_vec();
        }
        let result = match Self::source_of(device_event) {
            // A kick the worker read before the client stopped the queue
            // (GET_VRING_BASE, whose drain may have run meanwhile): the
            // ring is the client's again, and a pass over it would still
            // write there (the avail event).
            _ if usize::from(device_event) < K::QUEUES
                && !vrings.get(usize::from(device_event)).is_some_and(crate::worker::queue_ready) =>
            {
                Ok(())
            }
            _ if usize::from(device_event) < K::QUEUES => {
                self.core.metrics.kicks.fetch_add(1, Ordering::Relaxed);
                let kicked = self.kind.queue_kicked(&mut self.core, usize::from(device_event), vrings);
                // The driver must be awake for the poll to find anything.
                self.core.wake_sleeping_driver();
                kicked.and_then(|()| self.poll_for_completions(vrings))
            }
            Some(source) => self.on_source(source, vrings),
            None => Ok(()),
        };
        self.after_event(vrings, device_event, result);
        Ok(())
    }
}
