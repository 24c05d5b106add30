//! The vhost-user-blk device: a `VhostUserBackendMut` whose requests are
//! served by a driver VM, which it replaces transparently when it fails.
//!
//! Flow: the client kicks queue 0 → chains are parsed (`marshal`) → each
//! well-formed request takes a bounce slot and an id (`inflight`), a write's
//! payload is copied in, and the request is pushed into the channel → the
//! driver VM's doorbell wakes the worker → completions are judged
//! (`driver_answers`), a read's payload is copied out, and the chain is
//! completed in the client's used ring.
//!
//! Recovery (DESIGN.md, restart protocol): on a fault (the vmm exited, a
//! protocol violation, no progress within the hang deadline) the driver VM
//! is killed, completions that pass every check are kept, the channel starts
//! a new generation, a new driver VM is started (it resets the controller),
//! and every request still in flight is replayed in order, its payload
//! copied again from client memory. The client sees a stall, not an error.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_abi::channel::{self, RequestEntry};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap, VolatileSlice};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::inflight::{InFlight, InFlightTable};
use super::marshal::{self, BlkRequest, Limits, RequestKind, Segment};
use crate::channel::Channel;
use crate::client_memory;
use crate::driver_answers::{self, Evidence, WrittenSums};
use crate::driver_vms::DriverVms;
use crate::driver_watch::{ResourceWatch, WATCH_PERIOD};
use crate::hw::{BlockHardware, InterruptRoute};
use crate::metrics::Metrics;
use crate::recovery::{Fault, RecoveryConfig};
use crate::session::{Effect, Event, Session};
use crate::supervisor::DriverLauncher;
use crate::worker::{avail_overrun, nonblocking_timer, periodic_timer, signal_used};

/// Queues offered to the client.
pub const NUM_QUEUES: usize = 1;
/// Largest queue a client may set up: QEMU's limit for vhost-user-blk. A
/// request uses up to SEG_MAX + 2 descriptors, so deep queues of large
/// requests need this many.
pub const QUEUE_SIZE: usize = 1024;
/// Epoll data of the driver VM's completion doorbell (ids up to NUM_QUEUES
/// are the library's).
pub const COMPLETION_EVENT: u16 = NUM_QUEUES as u16 + 1;
/// Epoll data of "a driver VM exited".
pub const DRIVER_EXIT_EVENT: u16 = NUM_QUEUES as u16 + 2;
/// Epoll data of the hang watchdog timer.
pub const HANG_EVENT: u16 = NUM_QUEUES as u16 + 3;
/// Epoll data of the delayed-restart (and cool-down) timer.
pub const RESTART_EVENT: u16 = NUM_QUEUES as u16 + 4;
/// Epoll data of "an operator asked to recover a failed device".
pub const RECOVER_EVENT: u16 = NUM_QUEUES as u16 + 5;
/// Epoll data of "an operator (or the chaos command) asked to kill the
/// driver VM". Through the device, which kills by pidfd: a pid read from the
/// counters may be stale and reused by another process.
pub const KILL_EVENT: u16 = NUM_QUEUES as u16 + 6;
/// Epoll data of the periodic look at the driver VM's costs.
pub const WATCH_EVENT: u16 = NUM_QUEUES as u16 + 7;
/// Largest data segment advertised (size_max): one page, so that
/// `SEG_MAX` segments always fit one bounce slot.
const SIZE_MAX: u32 = 4096;
/// Most data segments per request (seg_max).
const SEG_MAX: u32 = channel::SLOT_SIZE / SIZE_MAX;

/// A request waiting for a free bounce slot or a driver VM.
struct Waiting {
    head: u16,
    request: BlkRequest,
    status: GuestAddress,
}

/// The device.
pub struct BlkDevice {
    name: String,
    limits: Limits,
    config: Vec<u8>,
    event_idx: bool,
    memory: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    /// The client's memory table registered with the SIGBUS guard; kept
    /// after a cut-off, while the mapping may still be touched.
    memory_guard: Option<client_memory::Registration>,
    client: u64,
    channel: Channel,
    hardware: Arc<dyn BlockHardware + Sync>,
    /// Checksums of written sectors (`checksums=on`), to judge reads.
    written: Option<WrittenSums>,
    in_flight: InFlightTable,
    waiting: VecDeque<Waiting>,
    completion_doorbell: EventFd,
    driver_exited: EventFd,
    drivers: DriverVms,
    /// The driver VMs' lifecycle (sans-IO): what to do about each event.
    session: Session,
    /// How often the hang watch looks (a quarter of the deadline).
    hang_period: Duration,
    /// Deaths a request may be in before it is a poison request.
    poison_deaths: u32,
    hang_timer: TimerFd,
    hang_armed: bool,
    restart_timer: TimerFd,
    /// What the driver VM costs, judged once per `WATCH_PERIOD`.
    watch: ResourceWatch,
    watch_timer: TimerFd,
    /// Doorbell rings and completions from driver VMs, for `watch`.
    rings: u64,
    answers: u64,
    recover: EventFd,
    kill: EventFd,
    /// When the client started waiting on a recovery: the fault, or the
    /// first request after it if none was pending at the fault.
    fault_at: Option<Instant>,
    /// A fault happened with nothing pending; the stall clock starts at the
    /// next request.
    fault_idle: bool,
    metrics: Arc<Metrics>,
}

/// What a device is wired to.
pub struct BlkWiring {
    /// The channel into the driver VM.
    pub channel: Channel,
    /// The storage controller (quiesced on faults).
    pub hardware: Arc<dyn BlockHardware + Sync>,
    /// Keep checksums of written sectors and judge reads by them.
    pub checksums: bool,
    /// Where the hardware's interrupt goes (routed to the driver VM's line 1).
    pub device_interrupt: Arc<InterruptRoute>,
    /// Signalled by the driver VM's completion doorbell (its doorbell 0).
    pub completion_doorbell: EventFd,
    /// Signalled when a driver VM process exits.
    pub driver_exited: EventFd,
    /// Starts driver VMs wired to this device.
    pub launcher: DriverLauncher,
}

impl BlkDevice {
    /// A device of `capacity_sectors` served through `wiring`; starts its
    /// first driver VM.
    pub fn new(
        name: &str,
        capacity_sectors: u64,
        read_only: bool,
        wiring: BlkWiring,
        recovery: RecoveryConfig,
    ) -> std::io::Result<Self> {
        let limits =
            Limits { capacity_sectors, max_data: channel::SLOT_SIZE, max_segments: SEG_MAX as usize, read_only };
        let drivers = DriverVms::start(wiring.launcher, wiring.device_interrupt, recovery.warm_spare)?;
        Ok(BlkDevice {
            name: name.to_owned(),
            limits,
            config: virtio_blk_config(capacity_sectors),
            event_idx: false,
            memory: None,
            memory_guard: None,
            client: 0,
            channel: wiring.channel,
            hardware: wiring.hardware,
            written: wiring.checksums.then(|| WrittenSums::new(capacity_sectors)),
            in_flight: InFlightTable::default(),
            waiting: VecDeque::new(),
            completion_doorbell: wiring.completion_doorbell,
            driver_exited: wiring.driver_exited,
            drivers,
            session: Session::new(recovery.policy, recovery.hang_deadline, Instant::now()),
            hang_period: recovery.hang_deadline / 4,
            poison_deaths: recovery.poison_deaths,
            hang_timer: nonblocking_timer()?,
            hang_armed: false,
            restart_timer: nonblocking_timer()?,
            watch: ResourceWatch::default(),
            watch_timer: periodic_timer(WATCH_PERIOD)?,
            rings: 0,
            answers: 0,
            recover: EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            kill: EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            fault_at: None,
            fault_idle: false,
            metrics: Arc::new(Metrics::default()),
        }
        .with_published_state())
    }

    fn with_published_state(self) -> Self {
        self.publish_state();
        self
    }

    /// Mirrors the state operators see (`reflector status`).
    fn publish_state(&self) {
        self.metrics.state.store(self.session.state().index(), Ordering::Relaxed);
        self.metrics.driver_pid.store(self.driver_pid().unwrap_or(0) as u64, Ordering::Relaxed);
        self.metrics.spare_pid.store(self.drivers.spare_pid().unwrap_or(0) as u64, Ordering::Relaxed);
        self.metrics.in_flight.store(self.in_flight.len() as u64, Ordering::Relaxed);
    }

    /// An eventfd that, when written, makes a failed device try a new
    /// driver VM at once (`reflector recover`).
    pub fn recover_trigger(&self) -> std::io::Result<EventFd> {
        self.recover.try_clone()
    }

    /// An eventfd that, when written, makes the device SIGKILL its current
    /// driver VM (`reflector kill`, chaos).
    pub fn kill_trigger(&self) -> std::io::Result<EventFd> {
        self.kill.try_clone()
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The current driver VM's pid, if one runs.
    pub fn driver_pid(&self) -> Option<libc::pid_t> {
        self.drivers.current_pid()
    }

    /// Kills the driver VM for good (the reflector is stopping).
    pub fn shutdown(&mut self) {
        self.drivers.shutdown();
    }

    /// The file descriptors the vhost-user worker must watch, with their
    /// event ids.
    pub fn listeners(&self) -> Vec<(std::os::fd::RawFd, u16)> {
        use std::os::fd::AsRawFd;
        vec![
            (self.watch_timer.as_raw_fd(), WATCH_EVENT),
            (self.completion_doorbell.as_raw_fd(), COMPLETION_EVENT),
            (self.driver_exited.as_raw_fd(), DRIVER_EXIT_EVENT),
            (self.hang_timer.as_raw_fd(), HANG_EVENT),
            (self.restart_timer.as_raw_fd(), RESTART_EVENT),
            (self.recover.as_raw_fd(), RECOVER_EVENT),
            (self.kill.as_raw_fd(), KILL_EVENT),
        ]
    }

    /// Stops serving the current client for good (it must reconnect):
    /// its memory faulted, or its queue is broken. Only it suffers.
    fn cut_off(&mut self, why: &str) {
        tracing::error!(device = %self.name, why, "no longer serving this client; it must reconnect");
        self.client_gone();
    }

    /// Whether touching the client's memory has faulted.
    fn client_memory_poisoned(&self) -> bool {
        self.memory_guard.as_ref().is_some_and(client_memory::Registration::poisoned)
    }

    /// Cuts the client off if touching its memory faulted: it shrank or
    /// lost the file behind its RAM, and only it may suffer for that.
    fn check_client_memory(&mut self) {
        if self.memory.is_some() && self.client_memory_poisoned() {
            self.metrics.client_memory_faults.fetch_add(1, Ordering::Relaxed);
            self.cut_off("its memory faulted: the file behind its RAM shrank or ran out of pages");
        }
    }

    /// Judges what the current driver VM cost over the last period.
    fn watch_driver(&mut self, vring: &VringRwLock) {
        if !self.session.running() {
            return;
        }
        let Some(pid) = self.drivers.current_pid() else { return };
        if !self.in_flight.is_empty() {
            self.watch.note_busy();
        }
        if let Some(abuse) = self.watch.look(pid, self.rings, self.answers) {
            self.metrics.abuses.fetch_add(1, Ordering::Relaxed);
            self.fault(vring, Fault::Abuse(abuse.to_string()));
        }
    }

    /// Forgets a client that went away: its queues are gone, so requests
    /// still in the driver VM complete into nothing.
    pub fn client_gone(&mut self) {
        tracing::trace!(device = %self.name, "client gone");
        self.waiting.clear();
        self.memory = None;
        self.client += 1;
    }

    fn process_queue(&mut self, vring: &VringRwLock) -> std::io::Result<()> {
        let Some(atomic) = self.memory.clone() else {
            tracing::debug!(device = %self.name, "queue kicked before the client's memory table arrived");
            return Ok(());
        };
        let memory = atomic.memory();
        loop {
            if avail_overrun(vring, &memory) {
                self.metrics.malformed.fetch_add(1, Ordering::Relaxed);
                self.cut_off("its queue's avail index runs beyond the queue size");
                return Ok(());
            }
            if self.event_idx {
                vring.disable_notification().map_err(std::io::Error::other)?;
            }
            let chains: Vec<(u16, Option<Vec<Segment>>)> = {
                let mut state = vring.get_mut();
                let mut chains = Vec::new();
                while let Some(chain) = state.get_queue_mut().pop_descriptor_chain(memory.clone()) {
                    let head = chain.head_index();
                    chains.push((head, marshal::chain_segments(chain, SEG_MAX as usize + 2)));
                }
                chains
            };
            tracing::trace!(device = %self.name, chains = chains.len(), "queue processed");
            for (head, segments) in chains {
                match segments {
                    Some(segments) => self.accept(vring, &memory, head, &segments),
                    None => {
                        // No status byte can be trusted in a chain that does not end.
                        self.metrics.requests.fetch_add(1, Ordering::Relaxed);
                        self.metrics.malformed.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(device = %self.name, head, "malformed request: the chain does not end");
                        self.complete(vring, &memory, head, None, marshal::VIRTIO_BLK_S_IOERR, 0);
                    }
                }
            }
            if !self.event_idx || !vring.enable_notification().map_err(std::io::Error::other)? {
                break;
            }
        }
        self.channel.publish(self.drivers.request_interrupt());
        self.arm_hang_watch();
        signal_used(vring)
    }

    fn accept(&mut self, vring: &VringRwLock, memory: &GuestMemoryMmap, head: u16, segments: &[Segment]) {
        self.metrics.requests.fetch_add(1, Ordering::Relaxed);
        let parsed = marshal::parse(memory, segments, &self.limits);
        let request = match parsed.request {
            Ok(request) => request,
            Err(reason) => {
                self.metrics.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(device = %self.name, head, %reason, "malformed request");
                return self.complete(vring, memory, head, parsed.status, reason.status(), 0);
            }
        };
        let status = parsed.status.unwrap_or(GuestAddress(0));
        match request.kind {
            RequestKind::GetId => {
                let id = format!("drvm-{}", self.name);
                let (code, written) = match marshal::write_id(memory, &request, &id) {
                    Ok(written) => (marshal::VIRTIO_BLK_S_OK, written),
                    Err(_) => (marshal::VIRTIO_BLK_S_IOERR, 0),
                };
                self.complete(vring, memory, head, Some(status), code, written);
            }
            _ if self.session.failed() => {
                self.complete(vring, memory, head, Some(status), marshal::VIRTIO_BLK_S_IOERR, 0);
            }
            _ => {
                if self.fault_idle {
                    self.fault_idle = false;
                    self.fault_at = Some(Instant::now());
                }
                self.waiting.push_back(Waiting { head, request, status });
                self.submit_waiting(vring, memory);
            }
        }
    }

    /// Moves waiting requests into free bounce slots and the channel, while
    /// a driver VM runs.
    fn submit_waiting(&mut self, vring: &VringRwLock, memory: &GuestMemoryMmap) {
        // While a request that was in a dying driver VM is pending, requests
        // go one at a time (`send_held`); new ones wait.
        while self.session.running() && !self.in_flight.serializing() {
            let Some(waiting) = self.waiting.pop_front() else { return };
            let data_len = waiting.request.data_len();
            let entry = InFlight {
                id: 0,
                head: waiting.head,
                request: waiting.request,
                data_len,
                status: waiting.status,
                client: self.client,
                flush_mark: 0,
                sums: Vec::new(),
                verifiable: false,
                deaths: 0,
                sent: true,
            };
            let (slot, _) = match self.in_flight.insert(entry) {
                Ok(taken) => taken,
                Err(InFlight { head, request, status, .. }) => {
                    self.waiting.push_front(Waiting { head, request, status });
                    return;
                }
            };
            if !self.send(memory, slot) {
                if let Some(entry) = self.in_flight.remove(slot) {
                    self.complete(vring, memory, entry.head, Some(entry.status), marshal::VIRTIO_BLK_S_IOERR, 0);
                }
            }
        }
    }

    /// Pushes the request in `slot` into the channel, copying a write's
    /// payload from client memory first. False if client memory failed.
    fn send(&mut self, memory: &GuestMemoryMmap, slot: u32) -> bool {
        let Some(entry) = self.in_flight.get(slot) else { return false };
        let request = &entry.request;
        let op = match request.kind {
            RequestKind::Read => channel::op::READ,
            RequestKind::Write => channel::op::WRITE,
            _ => channel::op::FLUSH,
        };
        let mut sums = Vec::new();
        if request.kind == RequestKind::Write {
            let copied = match self.written.is_some() {
                // Checksums are taken of what the client wrote, staged here:
                // the driver can change its bounce slot at any time.
                true => {
                    let mut data = vec![0u8; entry.data_len as usize];
                    let staged = marshal::copy_to_slot(memory, request, &VolatileSlice::from(&mut data[..]));
                    sums = WrittenSums::sums_of(&data);
                    staged.ok().and_then(|()| self.channel.slot(slot, data.len())).map(|bounce| {
                        bounce.copy_from(&data[..]);
                        Ok(())
                    })
                }
                false => self
                    .channel
                    .slot(slot, entry.data_len as usize)
                    .map(|bounce| marshal::copy_to_slot(memory, request, &bounce)),
            };
            // A fault while copying left zeros, not the client's data.
            if !matches!(copied, Some(Ok(()))) || self.client_memory_poisoned() {
                return false;
            }
        }
        self.gather_evidence(slot, sums);
        let Some(entry) = self.in_flight.get(slot) else { return false };
        let request = &entry.request;
        let (id, sector, len) = (entry.id, request.sector, entry.data_len);
        self.channel.push(RequestEntry { id, op, slot, sector, len, reserved: 0 });
        true
    }

    /// Notes, as the request in `slot` is sent, what its answer will be
    /// judged against: the device's flush count for a flush; with
    /// checksums, a write's data sums (`write_sums`; its sectors become
    /// unknown until it completes, and reads of them in flight
    /// unverifiable), and whether a read can be verified.
    fn gather_evidence(&mut self, slot: u32, write_sums: Vec<u32>) {
        let Some(entry) = self.in_flight.get(slot) else { return };
        let kind = entry.request.kind;
        let others_of = |wanted: RequestKind| -> Vec<u32> {
            let in_flight = self.in_flight.iter();
            in_flight
                .filter(|(s, other)| *s != slot && other.request.kind == wanted && entry.overlaps(other))
                .map(|(s, _)| s)
                .collect()
        };
        match kind {
            RequestKind::Flush => {
                let mark = self.hardware.flushes().started;
                if let Some(entry) = self.in_flight.get_mut(slot) {
                    entry.flush_mark = mark;
                }
            }
            RequestKind::Write if self.written.is_some() => {
                let (sectors, reads) = (entry.sectors(), others_of(RequestKind::Read));
                if let Some(written) = self.written.as_mut() {
                    written.forget(sectors.start, (sectors.end - sectors.start) as usize);
                }
                for read in reads {
                    if let Some(read) = self.in_flight.get_mut(read) {
                        read.verifiable = false;
                    }
                }
                if let Some(entry) = self.in_flight.get_mut(slot) {
                    entry.sums = write_sums;
                }
            }
            RequestKind::Read if self.written.is_some() => {
                let verifiable = others_of(RequestKind::Write).is_empty();
                if let Some(entry) = self.in_flight.get_mut(slot) {
                    entry.verifiable = verifiable;
                }
            }
            _ => {}
        }
    }

    /// Judges a completion that passed the protocol checks against the
    /// evidence (see `gather_evidence`); records a completed write's sums.
    /// Returns a verified read's data: the client gets that copy, not the
    /// bounce slot, which the driver may have changed since.
    fn judge_evidence(&mut self, slot: u32, status: u32) -> Result<Option<Vec<u8>>, driver_answers::Violation> {
        if status != channel::status::OK {
            return Ok(None);
        }
        let Some(entry) = self.in_flight.get(slot) else { return Ok(None) };
        let data = match (&self.written, entry.request.kind, entry.verifiable) {
            (Some(_), RequestKind::Read, true) => {
                let mut data = vec![0u8; entry.data_len as usize];
                if let Some(bounce) = self.channel.slot(slot, data.len()) {
                    bounce.copy_to(&mut data[..]);
                }
                Some(data)
            }
            _ => None,
        };
        let evidence =
            Evidence { flushes: self.hardware.flushes(), written: self.written.as_ref(), read_data: data.as_deref() };
        driver_answers::check_evidence(entry, &evidence)?;
        if entry.request.kind == RequestKind::Write && !entry.sums.is_empty() {
            let (sector, sums) = (entry.request.sector, entry.sums.clone());
            let others: Vec<std::ops::Range<u64>> = self
                .in_flight
                .iter()
                .filter(|(s, other)| *s != slot && other.request.kind == RequestKind::Write)
                .map(|(_, other)| other.sectors())
                .collect();
            if let Some(written) = self.written.as_mut() {
                written.record(sector, &sums, |at| others.iter().any(|covered| covered.contains(&at)));
            }
        }
        Ok(data)
    }

    fn process_completions(&mut self, vring: &VringRwLock) -> std::io::Result<()> {
        if !self.session.running() {
            return Ok(());
        }
        let atomic = self.memory.clone();
        let memory = atomic.as_ref().map(|m| m.memory());
        let completions = match self.channel.take_completions() {
            Ok(completions) => completions,
            Err(violation) => {
                self.metrics.violations.fetch_add(1, Ordering::Relaxed);
                self.fault(vring, Fault::Violation(violation.to_string()));
                return signal_used(vring);
            }
        };
        self.answers = self.answers.wrapping_add(completions.len() as u64);
        if !completions.is_empty() {
            self.watch.note_busy();
        }
        for completion in completions {
            let judged = driver_answers::check(&completion, &self.in_flight)
                .and_then(|answer| self.judge_evidence(answer.slot, answer.status).map(|data| (answer, data)));
            match judged {
                Ok((answer, verified)) => {
                    if let Some(entry) = self.in_flight.remove(answer.slot) {
                        self.progress();
                        if let (Some(memory), true) = (memory.as_deref(), entry.client == self.client) {
                            self.finish(vring, memory, answer.slot, entry, answer.status, verified);
                        }
                    }
                }
                Err(violation) => {
                    self.metrics.violations.fetch_add(1, Ordering::Relaxed);
                    self.fault(vring, Fault::Violation(violation.to_string()));
                    return signal_used(vring);
                }
            }
        }
        if let Some(memory) = memory.as_deref() {
            self.send_held(vring, memory);
            self.submit_waiting(vring, memory);
        }
        self.channel.publish(self.drivers.request_interrupt());
        signal_used(vring)
    }

    /// Sends the held requests the table releases (one suspect at a time
    /// after a death, then the rest: `InFlightTable::next_to_send`).
    fn send_held(&mut self, vring: &VringRwLock, memory: &GuestMemoryMmap) {
        for slot in self.in_flight.next_to_send() {
            let replayed = self.in_flight.get(slot).is_some_and(|entry| entry.deaths > 0);
            if self.send(memory, slot) {
                if replayed {
                    self.metrics.replayed.fetch_add(1, Ordering::Relaxed);
                }
            } else if let Some(entry) = self.in_flight.remove(slot) {
                self.complete(vring, memory, entry.head, Some(entry.status), marshal::VIRTIO_BLK_S_IOERR, 0);
            }
        }
    }

    /// Completes with an error every request that was in `poison_deaths`
    /// dying driver VMs (DESIGN.md, invariant 5), saying what it was.
    fn fail_poisoned(&mut self, vring: &VringRwLock, memory: Option<&GuestMemoryMmap>) {
        for (_, entry) in self.in_flight.take_poisoned(self.poison_deaths) {
            let what = format!(
                "{:?} of {} bytes at sector {} was in {} dying driver VMs in a row",
                entry.request.kind, entry.data_len, entry.request.sector, entry.deaths
            );
            tracing::error!(device = %self.name, request = %what, "poison request: completed with an I/O error");
            self.metrics.poisoned.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut last) = self.metrics.last_poison.lock() {
                *last = what;
            }
            if let (Some(memory), true) = (memory, entry.client == self.client) {
                self.complete(vring, memory, entry.head, Some(entry.status), marshal::VIRTIO_BLK_S_IOERR, 0);
            }
        }
    }

    /// A request completed: the driver VM is alive and making progress.
    fn progress(&mut self) {
        let now = Instant::now();
        self.session.progress(now);
        if let Some(fault_at) = self.fault_at.take() {
            let stall = now.duration_since(fault_at).as_micros() as u64;
            self.metrics.record_stall(stall);
            tracing::info!(device = %self.name, stall_us = stall, "recovered: first completion after the fault");
        }
        self.drivers.launch_wanted_spare();
    }

    /// Completes `entry` to the client; a read's data comes from `verified`
    /// if the judge checked a copy, else from the bounce slot.
    fn finish(
        &mut self,
        vring: &VringRwLock,
        memory: &GuestMemoryMmap,
        slot: u32,
        entry: InFlight,
        status: u32,
        verified: Option<Vec<u8>>,
    ) {
        let code = match status {
            channel::status::OK => marshal::VIRTIO_BLK_S_OK,
            channel::status::UNSUPPORTED => marshal::VIRTIO_BLK_S_UNSUPP,
            _ => marshal::VIRTIO_BLK_S_IOERR,
        };
        let mut written = 0;
        let code = match (code, entry.request.kind) {
            (marshal::VIRTIO_BLK_S_OK, RequestKind::Read) => {
                let copied = match verified {
                    Some(mut data) => {
                        Some(marshal::copy_from_slot(memory, &entry.request, &VolatileSlice::from(&mut data[..])))
                    }
                    None => self
                        .channel
                        .slot(slot, entry.data_len as usize)
                        .map(|bounce| marshal::copy_from_slot(memory, &entry.request, &bounce)),
                };
                if matches!(copied, Some(Ok(()))) {
                    written = entry.data_len;
                    self.metrics.bytes_read.fetch_add(u64::from(entry.data_len), Ordering::Relaxed);
                    code
                } else {
                    marshal::VIRTIO_BLK_S_IOERR
                }
            }
            (marshal::VIRTIO_BLK_S_OK, RequestKind::Write) => {
                self.metrics.bytes_written.fetch_add(u64::from(entry.data_len), Ordering::Relaxed);
                code
            }
            (code, _) => code,
        };
        self.complete(vring, memory, entry.head, Some(entry.status), code, written);
    }

    /// Completes a chain in the client's used ring.
    fn complete(
        &self,
        vring: &VringRwLock,
        memory: &GuestMemoryMmap,
        head: u16,
        status: Option<GuestAddress>,
        code: u8,
        written: u32,
    ) {
        let used_len = match status {
            Some(address) if marshal::write_status(memory, address, code) => written + 1,
            _ => 0,
        };
        if code != marshal::VIRTIO_BLK_S_OK {
            self.metrics.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.metrics.completed.fetch_add(1, Ordering::Relaxed);
        if let Err(error) = vring.add_used(head, used_len) {
            tracing::warn!(device = %self.name, head, %error, "cannot complete a request in the client's queue");
        }
    }

    /// Handles a driver VM fault: the session decides (kill it, keep what
    /// it finished correctly, then restart now, later, or fail).
    fn fault(&mut self, vring: &VringRwLock, fault: Fault) {
        self.handle(vring, Event::Fault(fault));
    }

    /// Feeds `event` to the session and carries out its effects, in order.
    fn handle(&mut self, vring: &VringRwLock, event: Event) {
        for effect in self.session.on(event, Instant::now()) {
            match effect {
                Effect::Retire(fault) => self.retire(vring, &fault),
                Effect::Launch => self.restart(vring),
                Effect::ArmTimer(delay) => {
                    if !self.session.failed() {
                        tracing::info!(device = %self.name, delay_ms = delay.as_millis() as u64, "restart delayed (backoff)");
                    }
                    self.arm_restart_timer(delay);
                }
                Effect::FailPending => {
                    tracing::error!(device = %self.name, "too many driver VM faults: the device fails its requests until the cool-down ends or an operator recovers it");
                    self.fail_pending(vring);
                }
                Effect::Kill => self.drivers.kill_current(),
            }
        }
        self.publish_state();
    }

    /// Kills the faulty driver VM and waits until it cannot run, quiesces
    /// the hardware, keeps what it finished correctly, and blames it on the
    /// requests it still held.
    fn retire(&mut self, vring: &VringRwLock, fault: &Fault) {
        let pid = self.drivers.current_pid();
        tracing::warn!(device = %self.name, driver_vm = %self.drivers.name(), ?pid, kind = fault.kind(), %fault, "driver VM fault");
        self.metrics.faults.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last) = self.metrics.last_fault.lock() {
            *last = format!("{}: {fault}", fault.kind());
        }
        self.drivers.drop_current();
        // Nothing the dead driver queued may run once the replay reuses its
        // bounce slots.
        self.hardware.quiesce();
        self.salvage(vring);
        // What it still held was in a dying driver VM.
        self.in_flight.blame_sent(fault.blames_requests());
        self.disarm_hang_watch();
        if self.fault_at.is_none() {
            self.fault_at = Some(Instant::now());
            self.fault_idle = self.in_flight.is_empty() && self.waiting.is_empty();
        }
    }

    /// Completes what the dead driver finished and answered correctly; stops
    /// at the first answer that fails a check.
    fn salvage(&mut self, vring: &VringRwLock) {
        let Ok(completions) = self.channel.take_completions() else { return };
        let atomic = self.memory.clone();
        let memory = atomic.as_ref().map(|m| m.memory());
        for completion in completions {
            let judged = driver_answers::check(&completion, &self.in_flight)
                .and_then(|answer| self.judge_evidence(answer.slot, answer.status).map(|data| (answer, data)));
            let Ok((answer, verified)) = judged else { return };
            if let Some(entry) = self.in_flight.remove(answer.slot) {
                if let (Some(memory), true) = (memory.as_deref(), entry.client == self.client) {
                    self.finish(vring, memory, answer.slot, entry, answer.status, verified);
                }
            }
        }
    }

    /// Starts a new driver VM on a new channel generation and replays every
    /// request still in flight, oldest first.
    fn restart(&mut self, vring: &VringRwLock) {
        let generation = self.channel.reset();
        // The old driver VM can no longer run (`drop_current` waited).
        self.hardware.resume();
        match self.drivers.replace() {
            Ok((pid, warm)) => {
                tracing::info!(device = %self.name, pid, generation, warm, "driver VM restarted");
                self.session.on(Event::Launched, Instant::now());
                // Observers that see the new restart count must also see
                // the new driver VM (the chaos command kills by pid).
                self.publish_state();
                self.metrics.restarts.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => {
                tracing::error!(device = %self.name, %error, "cannot start a driver VM");
                self.handle(vring, Event::LaunchFailed(error.to_string()));
                return;
            }
        }
        let atomic = self.memory.clone();
        let memory = atomic.as_ref().map(|m| m.memory());
        self.fail_poisoned(vring, memory.as_deref());
        for (slot, entry) in self.in_flight.drain() {
            if memory.is_none() || entry.client != self.client {
                continue;
            }
            // Same slot, new id: answers of the dead driver cannot match.
            // Held until `send_held` releases it.
            self.in_flight.insert_at(slot, entry);
        }
        if let Some(memory) = memory.as_deref() {
            self.send_held(vring, memory);
        }
        if let Some(memory) = memory.as_deref() {
            self.submit_waiting(vring, memory);
        }
        self.channel.publish(self.drivers.request_interrupt());
        self.arm_hang_watch();
        if self.in_flight.is_empty() {
            self.drivers.launch_wanted_spare();
        }
        let _ = signal_used(vring);
    }

    /// Fails every pending request (the device is declared failed).
    fn fail_pending(&mut self, vring: &VringRwLock) {
        let atomic = self.memory.clone();
        let memory = atomic.as_ref().map(|m| m.memory());
        let client = self.client;
        for (_, entry) in self.in_flight.drain() {
            if let (Some(memory), true) = (memory.as_deref(), entry.client == client) {
                self.complete(vring, memory, entry.head, Some(entry.status), marshal::VIRTIO_BLK_S_IOERR, 0);
            }
        }
        while let Some(waiting) = self.waiting.pop_front() {
            if let Some(memory) = memory.as_deref() {
                self.complete(vring, memory, waiting.head, Some(waiting.status), marshal::VIRTIO_BLK_S_IOERR, 0);
            }
        }
        let _ = signal_used(vring);
    }

    fn arm_hang_watch(&mut self) {
        if self.hang_armed || self.in_flight.is_empty() || !self.session.running() {
            return;
        }
        self.session.progress(Instant::now());
        let period = self.hang_period;
        if self.hang_timer.reset(period, Some(period)).is_ok() {
            self.hang_armed = true;
        }
    }

    fn disarm_hang_watch(&mut self) {
        if self.hang_armed {
            let _ = self.hang_timer.clear();
            self.hang_armed = false;
        }
    }

    fn check_hang(&mut self, vring: &VringRwLock) {
        let _ = self.hang_timer.wait();
        if self.in_flight.is_empty() || !self.session.running() {
            self.disarm_hang_watch();
            return;
        }
        self.handle(vring, Event::HangCheck { pending: true });
    }

    fn arm_restart_timer(&mut self, delay: Duration) {
        if let Err(error) = self.restart_timer.reset(delay.max(Duration::from_micros(1)), None) {
            tracing::error!(device = %self.name, %error, "cannot arm the restart timer");
        }
    }

    fn restart_timer_fired(&mut self, vring: &VringRwLock) {
        let _ = self.restart_timer.wait();
        self.handle(vring, Event::TimerFired);
    }

    fn driver_exited(&mut self, vring: &VringRwLock) {
        let _ = self.driver_exited.read();
        if let Some(report) = self.drivers.exited() {
            self.fault(vring, Fault::Exited(report));
        }
    }
}

/// The virtio-blk configuration space (virtio spec 5.2.4), up to num_queues.
fn virtio_blk_config(capacity_sectors: u64) -> Vec<u8> {
    use virtio::blk::config;
    let mut bytes = vec![0u8; config::LEN];
    bytes[config::CAPACITY..config::CAPACITY + 8].copy_from_slice(&capacity_sectors.to_le_bytes());
    bytes[config::SIZE_MAX..config::SIZE_MAX + 4].copy_from_slice(&SIZE_MAX.to_le_bytes());
    bytes[config::SEG_MAX..config::SEG_MAX + 4].copy_from_slice(&SEG_MAX.to_le_bytes());
    bytes[config::BLK_SIZE..config::BLK_SIZE + 4].copy_from_slice(&(virtio::blk::SECTOR_SIZE as u32).to_le_bytes());
    bytes[config::NUM_QUEUES..config::NUM_QUEUES + 2].copy_from_slice(&(NUM_QUEUES as u16).to_le_bytes());
    bytes
}

impl VhostUserBackendMut for BlkDevice {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        let mut features = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.limits.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        features
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        crate::worker::config_read(&self.config, offset, size)
    }

    /// Each vhost-user worker gets an exit event, so that when a client
    /// disconnects the worker can be stopped and a new connection served.
    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(error) => {
                tracing::error!(device = %self.name, %error, "cannot create a worker exit event");
                None
            }
        }
    }

    fn update_memory(&mut self, memory: GuestMemoryAtomic<GuestMemoryMmap>) -> std::io::Result<()> {
        tracing::trace!(device = %self.name, "client memory table");
        self.memory = None;
        let registration = client_memory::accept(&self.name, &memory.memory())?;
        self.memory = Some(memory);
        self.memory_guard = Some(registration);
        Ok(())
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        let Some(vring) = vrings.first() else { return Ok(()) };
        tracing::trace!(device = %self.name, device_event, memory = self.memory.is_some(), "worker event");
        let result = match device_event {
            0 => self.process_queue(vring),
            COMPLETION_EVENT => {
                if let Ok(rings) = self.completion_doorbell.read() {
                    self.rings = self.rings.wrapping_add(rings);
                    self.metrics.doorbells.fetch_add(rings, Ordering::Relaxed);
                }
                self.process_completions(vring)
            }
            DRIVER_EXIT_EVENT => {
                self.driver_exited(vring);
                signal_used(vring)
            }
            HANG_EVENT => {
                self.check_hang(vring);
                signal_used(vring)
            }
            RESTART_EVENT => {
                self.restart_timer_fired(vring);
                signal_used(vring)
            }
            RECOVER_EVENT => {
                let _ = self.recover.read();
                tracing::info!(device = %self.name, "recovery requested by an operator");
                self.handle(vring, Event::Recover);
                signal_used(vring)
            }
            WATCH_EVENT => {
                let _ = self.watch_timer.wait();
                self.watch_driver(vring);
                Ok(())
            }
            KILL_EVENT => {
                let _ = self.kill.read();
                self.handle(vring, Event::Kill);
                Ok(())
            }
            _ => Ok(()),
        };
        self.check_client_memory();
        self.publish_state();
        // An error returned here would end vhost-user-backend's worker loop
        // for good, and with it the connection's I/O: report it instead.
        if let Err(error) = result {
            tracing::warn!(device = %self.name, device_event, %error, "event handling failed");
        }
        Ok(())
    }
}
