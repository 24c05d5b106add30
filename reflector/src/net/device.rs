//! The vhost-user-net device: a `VhostUserBackendMut` whose frames are
//! moved by a driver VM driving a network card, which it replaces
//! transparently when it fails.
//!
//! Transmit: the client kicks the TX queue → each chain is checked and its
//! frame copied into a free TX slot (`marshal`), the chain is returned to
//! the client at once, and the frame is pushed into the channel; the driver
//! hands it to the card. Receive: the reflector keeps its RX slots posted
//! to the driver as empty buffers; a completed one holds a frame until the
//! client has receive buffers for it (mergeable buffers let a frame span
//! several), then is posted again. The client's receive chains are taken
//! from its queue as soon as it offers them, and wait here for frames.
//!
//! Recovery (DESIGN.md, restart protocol) is the block device's, with
//! network semantics: on a fault the driver VM is killed and the card
//! quiesced, valid answers are kept, frames the dead driver was sending are
//! lost (at most once: never sent again), received frames not yet delivered
//! are kept, and a new driver VM resets the card. The link the client sees
//! stays up throughout: it is the card's carrier, not the driver's state.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_abi::channel::{self, RequestEntry};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::marshal::{self, Malformed, Segment};
use super::slots::{NetSlots, SlotState};
use crate::channel::Channel;
use crate::client_memory;
use crate::driver_answers::{self, NetAnswer};
use crate::driver_vms::DriverVms;
use crate::driver_watch::{ResourceWatch, WATCH_PERIOD};
use crate::hw::{InterruptRoute, NetHardware};
use crate::metrics::Metrics;
use crate::recovery::{Fault, RecoveryConfig};
use crate::session::{Effect, Event, Lifecycle, Session};
use crate::supervisor::DriverLauncher;
use crate::worker::{avail_overrun, nonblocking_timer, periodic_timer, signal_used};

/// Queues offered to the client: one receive/transmit pair.
pub const NUM_QUEUES: usize = 2;
/// Largest queue a client may set up (QEMU's limit for vhost-user-net).
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
/// Epoll data of "kill the driver VM" (operators, chaos).
pub const KILL_EVENT: u16 = NUM_QUEUES as u16 + 6;
/// Epoll data of the periodic look at the driver VM's costs.
pub const WATCH_EVENT: u16 = NUM_QUEUES as u16 + 7;
/// Longest descriptor chain read: a frame of at most MAX_FRAME bytes plus
/// its header needs no more, whatever the client's buffer sizes.
const MAX_CHAIN: usize = guest_abi::nic::MAX_FRAME as usize + virtio::net::HEADER_LEN;

/// A client receive chain waiting for a frame.
struct RxBuffer {
    head: u16,
    segments: Vec<Segment>,
    capacity: u32,
}

/// What a net device is wired to.
pub struct NetWiring {
    /// The channel into the driver VM.
    pub channel: Channel,
    /// The card (quiesced on faults; its MAC and link are the client's).
    pub hardware: Arc<dyn NetHardware + Sync>,
    /// Where the card's interrupt goes (routed to the driver VM's line 1).
    pub device_interrupt: Arc<InterruptRoute>,
    /// Signalled by the driver VM's completion doorbell (its doorbell 0).
    pub completion_doorbell: EventFd,
    /// Signalled when a driver VM process exits.
    pub driver_exited: EventFd,
    /// Starts driver VMs wired to this device.
    pub launcher: DriverLauncher,
}

/// The device.
pub struct NetDevice {
    name: String,
    hardware: Arc<dyn NetHardware + Sync>,
    event_idx: bool,
    mergeable: bool,
    memory: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    /// The client's memory table registered with the SIGBUS guard; kept
    /// after a cut-off, while the mapping may still be touched.
    memory_guard: Option<client_memory::Registration>,
    channel: Channel,
    slots: NetSlots,
    /// RX slots holding frames, oldest first.
    held: VecDeque<u32>,
    /// Client receive chains taken from its queue, oldest first.
    rx_buffers: VecDeque<RxBuffer>,
    completion_doorbell: EventFd,
    driver_exited: EventFd,
    drivers: DriverVms,
    /// The driver VMs' lifecycle (sans-IO): what to do about each event.
    session: Session,
    /// How often the hang watch looks (a quarter of the deadline).
    hang_period: Duration,
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
    fault_at: Option<Instant>,
    metrics: Arc<Metrics>,
}

impl NetDevice {
    /// A device served through `wiring`; starts its first driver VM.
    pub fn new(name: &str, wiring: NetWiring, recovery: RecoveryConfig) -> std::io::Result<Self> {
        let drivers = DriverVms::start(wiring.launcher, wiring.device_interrupt, recovery.warm_spare)?;
        let mut device = NetDevice {
            name: name.to_owned(),
            hardware: wiring.hardware,
            event_idx: false,
            mergeable: false,
            memory: None,
            memory_guard: None,
            channel: wiring.channel,
            slots: NetSlots::default(),
            held: VecDeque::new(),
            rx_buffers: VecDeque::new(),
            completion_doorbell: wiring.completion_doorbell,
            driver_exited: wiring.driver_exited,
            drivers,
            session: Session::new(recovery.policy, recovery.hang_deadline, Instant::now()),
            hang_period: recovery.hang_deadline / 4,
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
            metrics: Arc::new(Metrics::default()),
        };
        device.post_rx_buffers();
        device.publish_state();
        Ok(device)
    }

    /// Mirrors the state operators see (`reflector status`).
    fn publish_state(&self) {
        self.metrics.state.store(self.session.state().index(), Ordering::Relaxed);
        self.metrics.driver_pid.store(self.drivers.current_pid().unwrap_or(0) as u64, Ordering::Relaxed);
        self.metrics.spare_pid.store(self.drivers.spare_pid().unwrap_or(0) as u64, Ordering::Relaxed);
        self.metrics.in_flight.store(self.slots.tx_in_flight() as u64, Ordering::Relaxed);
    }

    /// An eventfd that makes a failed device try a new driver VM at once.
    pub fn recover_trigger(&self) -> std::io::Result<EventFd> {
        self.recover.try_clone()
    }

    /// An eventfd that makes the device SIGKILL its current driver VM.
    pub fn kill_trigger(&self) -> std::io::Result<EventFd> {
        self.kill.try_clone()
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Kills the driver VMs for good (the reflector is stopping).
    pub fn shutdown(&mut self) {
        self.drivers.shutdown();
    }

    /// The file descriptors the vhost-user worker must watch, with their ids.
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
    fn watch_driver(&mut self, vrings: &[VringRwLock]) {
        if !self.session.running() {
            return;
        }
        let Some(pid) = self.drivers.current_pid() else { return };
        if self.slots.tx_in_flight() > 0 {
            self.watch.note_busy();
        }
        if let Some(abuse) = self.watch.look(pid, self.rings, self.answers) {
            self.metrics.abuses.fetch_add(1, Ordering::Relaxed);
            self.fault(vrings, Fault::Abuse(abuse.to_string()));
        }
    }

    /// Forgets a client that went away: its buffers are gone, and frames
    /// received for it are dropped.
    pub fn client_gone(&mut self) {
        self.rx_buffers.clear();
        self.metrics.rx_dropped.fetch_add(self.held.len() as u64, Ordering::Relaxed);
        for slot in self.held.drain(..) {
            self.slots.release(slot);
        }
        self.memory = None;
        self.post_rx_buffers();
    }

    /// Posts every idle RX slot to the driver, while one runs.
    fn post_rx_buffers(&mut self) {
        if !self.session.running() {
            return;
        }
        let posted = self.slots.post_idle_rx();
        if posted.is_empty() {
            return;
        }
        for (slot, id) in posted {
            let len = channel::SLOT_SIZE.min(guest_abi::nic::MAX_FRAME);
            self.channel.push(RequestEntry { id, op: channel::op::NET_RX, slot, sector: 0, len, reserved: 0 });
        }
        self.channel.publish(self.drivers.request_interrupt());
    }

    /// Takes the client's transmit chains while TX slots are free (or drops
    /// them while the device has failed).
    fn process_tx(&mut self, tx: &VringRwLock) -> std::io::Result<()> {
        let Some(atomic) = self.memory.clone() else { return Ok(()) };
        let memory = atomic.memory();
        if !tx.get_ref().get_queue().ready() {
            return Ok(());
        }
        let mut sent = false;
        loop {
            if avail_overrun(tx, &memory) {
                self.metrics.malformed.fetch_add(1, Ordering::Relaxed);
                self.cut_off("its TX queue's avail index runs beyond the queue size");
                return Ok(());
            }
            if self.event_idx {
                tx.disable_notification().map_err(std::io::Error::other)?;
            }
            while self.can_take_tx() {
                let Some((head, segments)) = pop_chain(tx, &memory) else { break };
                sent |= self.transmit(&memory, head, segments.as_deref());
                if let Err(error) = tx.add_used(head, 0) {
                    tracing::warn!(device = %self.name, head, %error, "cannot return a transmit chain");
                }
            }
            // Chains left while no slot (or no driver VM) can take them wait
            // for a completion or a restart, not for a kick.
            if !self.can_take_tx() || !self.event_idx || !tx.enable_notification().map_err(std::io::Error::other)? {
                break;
            }
        }
        if sent {
            self.channel.publish(self.drivers.request_interrupt());
            self.arm_hang_watch();
        }
        signal_used(tx)
    }

    /// Whether transmit chains can be taken now: into a free TX slot of a
    /// running driver VM, or dropped while the device has failed.
    fn can_take_tx(&self) -> bool {
        match self.session.state() {
            Lifecycle::Running { .. } => self.slots.tx_available(),
            Lifecycle::Failed { .. } => true,
            Lifecycle::Restarting { .. } | Lifecycle::BackingOff { .. } => false,
        }
    }

    /// Copies one transmit chain's frame into a TX slot and the channel;
    /// false if it was dropped (malformed, or the device failed).
    fn transmit(&mut self, memory: &GuestMemoryMmap, head: u16, segments: Result<&[Segment], &Malformed>) -> bool {
        let checked = segments.map_err(Malformed::clone).and_then(|s| Ok((s, marshal::tx_frame_len(memory, s)?)));
        let (segments, len) = match checked {
            Ok(checked) => checked,
            Err(reason) => {
                self.metrics.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(device = %self.name, head, %reason, "malformed transmit chain dropped");
                return false;
            }
        };
        if self.session.failed() {
            self.metrics.tx_lost.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let Some((slot, id)) = self.slots.start_tx(len) else { return false };
        let copied =
            self.channel.slot(slot, len as usize).map(|bounce| marshal::copy_tx_frame(memory, segments, &bounce));
        // A fault while copying left zeros, not the client's frame.
        if !matches!(copied, Some(Ok(_))) || self.client_memory_poisoned() {
            self.slots.release(slot);
            self.metrics.malformed.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        self.channel.push(RequestEntry { id, op: channel::op::NET_TX, slot, sector: 0, len, reserved: 0 });
        self.metrics.tx_frames.fetch_add(1, Ordering::Relaxed);
        self.metrics.tx_bytes.fetch_add(u64::from(len), Ordering::Relaxed);
        true
    }

    /// Takes every receive chain the client offers, then delivers held frames.
    fn process_rx(&mut self, rx: &VringRwLock) -> std::io::Result<()> {
        let Some(atomic) = self.memory.clone() else { return Ok(()) };
        let memory = atomic.memory();
        if !rx.get_ref().get_queue().ready() {
            return Ok(());
        }
        loop {
            if avail_overrun(rx, &memory) {
                self.metrics.malformed.fetch_add(1, Ordering::Relaxed);
                self.cut_off("its RX queue's avail index runs beyond the queue size");
                return Ok(());
            }
            if self.event_idx {
                rx.disable_notification().map_err(std::io::Error::other)?;
            }
            while let Some((head, segments)) = pop_chain(rx, &memory) {
                match segments.and_then(|segments| marshal::rx_capacity(&memory, &segments).map(|c| (segments, c))) {
                    Ok((segments, capacity)) => self.rx_buffers.push_back(RxBuffer { head, segments, capacity }),
                    Err(reason) => {
                        self.metrics.malformed.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(device = %self.name, head, %reason, "malformed receive chain returned unused");
                        let _ = rx.add_used(head, 0);
                    }
                }
            }
            if !self.event_idx || !rx.enable_notification().map_err(std::io::Error::other)? {
                break;
            }
        }
        self.deliver_held(rx, &memory);
        signal_used(rx)
    }

    /// Writes held frames into the client's receive chains, oldest first,
    /// and posts the freed slots again.
    fn deliver_held(&mut self, rx: &VringRwLock, memory: &GuestMemoryMmap) {
        while let Some(&slot) = self.held.front() {
            let Some((SlotState::RxHeld(len), _)) = self.slots.get(slot) else {
                self.held.pop_front();
                continue;
            };
            let needed = virtio::net::HEADER_LEN as u32 + len;
            let Some(count) = self.buffers_for(needed) else { break };
            self.held.pop_front();
            let chains: Vec<RxBuffer> = self.rx_buffers.drain(..count).collect();
            if count == 0 {
                // The client's buffers are too small for the frame (no
                // mergeable buffers negotiated): drop the frame, keep them.
                self.metrics.rx_dropped.fetch_add(1, Ordering::Relaxed);
                self.slots.release(slot);
                continue;
            }
            let segments: Vec<Vec<Segment>> = chains.iter().map(|c| c.segments.clone()).collect();
            let written =
                self.channel.slot(slot, len as usize).map(|frame| marshal::write_rx_frame(memory, &segments, &frame));
            self.slots.release(slot);
            let used = match written {
                Some(Ok(used)) => {
                    self.metrics.rx_frames.fetch_add(1, Ordering::Relaxed);
                    self.metrics.rx_bytes.fetch_add(u64::from(len), Ordering::Relaxed);
                    used
                }
                _ => {
                    self.metrics.rx_dropped.fetch_add(1, Ordering::Relaxed);
                    vec![0; chains.len()]
                }
            };
            for (chain, used) in chains.iter().zip(used) {
                if let Err(error) = rx.add_used(chain.head, used) {
                    tracing::warn!(device = %self.name, head = chain.head, %error, "cannot return a receive chain");
                }
            }
        }
        self.post_rx_buffers();
    }

    /// How many of the waiting receive chains a frame of `needed` bytes
    /// takes; `Some(0)` if it can never fit, `None` if more are needed.
    fn buffers_for(&self, needed: u32) -> Option<usize> {
        if !self.mergeable {
            let first = self.rx_buffers.front()?;
            return Some(if first.capacity >= needed { 1 } else { 0 });
        }
        let mut total = 0u64;
        for (index, buffer) in self.rx_buffers.iter().enumerate() {
            total += u64::from(buffer.capacity);
            if total >= u64::from(needed) {
                return Some(index + 1);
            }
        }
        None
    }

    fn process_completions(&mut self, vrings: &[VringRwLock]) -> std::io::Result<()> {
        if !self.session.running() {
            return Ok(());
        }
        let completions = match self.channel.take_completions() {
            Ok(completions) => completions,
            Err(violation) => {
                self.metrics.violations.fetch_add(1, Ordering::Relaxed);
                self.fault(vrings, Fault::Violation(violation.to_string()));
                return Ok(());
            }
        };
        self.answers = self.answers.wrapping_add(completions.len() as u64);
        if !completions.is_empty() {
            self.watch.note_busy();
        }
        for completion in completions {
            match driver_answers::check_net(&completion, &self.slots) {
                Ok(answer) => self.take_answer(answer),
                Err(violation) => {
                    self.metrics.violations.fetch_add(1, Ordering::Relaxed);
                    self.fault(vrings, Fault::Violation(violation.to_string()));
                    return Ok(());
                }
            }
        }
        self.after_answers(vrings)
    }

    fn take_answer(&mut self, answer: NetAnswer) {
        self.progress();
        match answer {
            NetAnswer::Sent { slot, sent } => {
                if !sent {
                    self.metrics.errors.fetch_add(1, Ordering::Relaxed);
                }
                self.slots.release(slot);
            }
            NetAnswer::Received { slot, len: Some(len) } => {
                self.slots.hold(slot, len);
                self.held.push_back(slot);
            }
            NetAnswer::Received { slot, len: None } => {
                self.metrics.errors.fetch_add(1, Ordering::Relaxed);
                self.slots.release(slot);
            }
        }
    }

    /// After answers: deliver frames, send what waited for slots.
    fn after_answers(&mut self, vrings: &[VringRwLock]) -> std::io::Result<()> {
        let (Some(rx), Some(tx)) = (vrings.get(virtio::net::RX_QUEUE), vrings.get(virtio::net::TX_QUEUE)) else {
            return Ok(());
        };
        match self.memory.clone() {
            Some(atomic) if rx.get_ref().get_queue().ready() => {
                self.deliver_held(rx, &atomic.memory());
                signal_used(rx)?;
            }
            _ => self.post_rx_buffers(),
        }
        self.process_tx(tx)
    }

    /// A completion arrived: the driver VM is alive and making progress.
    fn progress(&mut self) {
        let now = Instant::now();
        self.session.progress(now);
        if let Some(fault_at) = self.fault_at.take() {
            let stall = now.duration_since(fault_at).as_micros() as u64;
            self.metrics.record_stall(stall);
            tracing::info!(device = %self.name, stall_us = stall, "recovered: first completion after the fault");
            self.drivers.launch_wanted_spare();
        }
    }

    /// Handles a driver VM fault: the session decides (kill it, stop the
    /// card's DMA, keep what it answered correctly, then restart now,
    /// later, or fail).
    fn fault(&mut self, vrings: &[VringRwLock], fault: Fault) {
        self.handle(vrings, Event::Fault(fault));
    }

    /// Feeds `event` to the session and carries out its effects, in order.
    fn handle(&mut self, vrings: &[VringRwLock], event: Event) {
        for effect in self.session.on(event, Instant::now()) {
            match effect {
                Effect::Retire(fault) => self.retire(&fault),
                Effect::Launch => self.restart(vrings),
                Effect::ArmTimer(delay) => {
                    if !self.session.failed() {
                        tracing::info!(device = %self.name, delay_ms = delay.as_millis() as u64, "restart delayed (backoff)");
                    }
                    self.arm_restart_timer(delay);
                }
                Effect::FailPending => {
                    tracing::error!(device = %self.name, "too many driver VM faults: the device drops frames until the cool-down ends or an operator recovers it");
                    if let Some(tx) = vrings.get(virtio::net::TX_QUEUE) {
                        let _ = self.process_tx(tx);
                    }
                }
                Effect::Kill => self.drivers.kill_current(),
            }
        }
        self.publish_state();
    }

    /// Kills the faulty driver VM and waits until it cannot run, stops the
    /// card's DMA, keeps what it answered correctly; frames it still held
    /// are lost (never sent twice).
    fn retire(&mut self, fault: &Fault) {
        let pid = self.drivers.current_pid();
        tracing::warn!(device = %self.name, driver_vm = %self.drivers.name(), ?pid, kind = fault.kind(), %fault, "driver VM fault");
        self.metrics.faults.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last) = self.metrics.last_fault.lock() {
            *last = format!("{}: {fault}", fault.kind());
        }
        self.drivers.drop_current();
        self.hardware.quiesce();
        self.salvage();
        let lost = self.slots.driver_gone();
        self.metrics.tx_lost.fetch_add(lost, Ordering::Relaxed);
        self.disarm_hang_watch();
        if self.memory.is_some() {
            // The stall a client sees; with no client there is none.
            self.fault_at.get_or_insert_with(Instant::now);
        }
    }

    /// Keeps what the dead driver answered correctly; stops at the first
    /// answer that fails a check.
    fn salvage(&mut self) {
        let Ok(completions) = self.channel.take_completions() else { return };
        for completion in completions {
            let Ok(answer) = driver_answers::check_net(&completion, &self.slots) else { return };
            self.take_answer(answer);
        }
    }

    /// Starts a new driver VM on a new channel generation and gives it the
    /// receive buffers and whatever waited to be sent.
    fn restart(&mut self, vrings: &[VringRwLock]) {
        let generation = self.channel.reset();
        // The old driver VM can no longer run (`drop_current` waited).
        self.hardware.resume();
        match self.drivers.replace() {
            Ok((pid, warm)) => {
                tracing::info!(device = %self.name, pid, generation, warm, "driver VM restarted");
                self.session.on(Event::Launched, Instant::now());
                self.publish_state();
                self.metrics.restarts.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => {
                tracing::error!(device = %self.name, %error, "cannot start a driver VM");
                self.handle(vrings, Event::LaunchFailed(error.to_string()));
                return;
            }
        }
        if let Err(error) = self.after_answers(vrings) {
            tracing::warn!(device = %self.name, %error, "resuming the queues after a restart failed");
        }
        self.channel.publish(self.drivers.request_interrupt());
    }

    fn arm_hang_watch(&mut self) {
        if self.hang_armed || self.slots.tx_in_flight() == 0 || !self.session.running() {
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

    fn check_hang(&mut self, vrings: &[VringRwLock]) {
        let _ = self.hang_timer.wait();
        if self.slots.tx_in_flight() == 0 || !self.session.running() {
            self.disarm_hang_watch();
            return;
        }
        self.handle(vrings, Event::HangCheck { pending: true });
    }

    fn arm_restart_timer(&mut self, delay: Duration) {
        if let Err(error) = self.restart_timer.reset(delay.max(Duration::from_micros(1)), None) {
            tracing::error!(device = %self.name, %error, "cannot arm the restart timer");
        }
    }

    fn restart_timer_fired(&mut self, vrings: &[VringRwLock]) {
        let _ = self.restart_timer.wait();
        self.handle(vrings, Event::TimerFired);
    }

    fn config_space(&self) -> Vec<u8> {
        use virtio::net::config;
        let mut bytes = vec![0u8; config::LEN];
        bytes[config::MAC..config::MAC + 6].copy_from_slice(&self.hardware.mac());
        let status = if self.hardware.link_up() { virtio::net::S_LINK_UP } else { 0 };
        bytes[config::STATUS..config::STATUS + 2].copy_from_slice(&status.to_le_bytes());
        bytes[config::MAX_VIRTQUEUE_PAIRS..config::MAX_VIRTQUEUE_PAIRS + 2].copy_from_slice(&1u16.to_le_bytes());
        bytes
    }
}

/// Pops one chain with its descriptors (at most MAX_CHAIN bytes' worth are
/// kept: a longer chain is refused by `marshal` for its length anyway).
fn pop_chain(vring: &VringRwLock, memory: &GuestMemoryMmap) -> Option<(u16, Result<Vec<Segment>, Malformed>)> {
    let mut state = vring.get_mut();
    let chain = state.get_queue_mut().pop_descriptor_chain(memory)?;
    let head = chain.head_index();
    Some((head, marshal::chain_segments(chain, MAX_CHAIN + virtio::net::HEADER_LEN)))
}

impl VhostUserBackendMut for NetDevice {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_NET_F_MAC
            | 1 << VIRTIO_NET_F_STATUS
            | 1 << VIRTIO_NET_F_MRG_RXBUF
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&mut self, features: u64) {
        self.mergeable = features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
        tracing::debug!(device = %self.name, features = format_args!("{features:#x}"), mergeable = self.mergeable, "client features");
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        crate::worker::config_read(&self.config_space(), offset, size)
    }

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
        let (Some(rx), Some(tx)) = (vrings.get(virtio::net::RX_QUEUE), vrings.get(virtio::net::TX_QUEUE)) else {
            return Ok(());
        };
        tracing::trace!(device = %self.name, device_event, "worker event");
        let result = match device_event {
            0 => self.process_rx(rx),
            1 => self.process_tx(tx),
            COMPLETION_EVENT => {
                if let Ok(rings) = self.completion_doorbell.read() {
                    self.rings = self.rings.wrapping_add(rings);
                    self.metrics.doorbells.fetch_add(rings, Ordering::Relaxed);
                }
                self.process_completions(vrings)
            }
            DRIVER_EXIT_EVENT => {
                let _ = self.driver_exited.read();
                if let Some(report) = self.drivers.exited() {
                    self.fault(vrings, Fault::Exited(report));
                }
                Ok(())
            }
            HANG_EVENT => {
                self.check_hang(vrings);
                Ok(())
            }
            RESTART_EVENT => {
                self.restart_timer_fired(vrings);
                Ok(())
            }
            RECOVER_EVENT => {
                let _ = self.recover.read();
                tracing::info!(device = %self.name, "recovery requested by an operator");
                self.handle(vrings, Event::Recover);
                Ok(())
            }
            WATCH_EVENT => {
                let _ = self.watch_timer.wait();
                self.watch_driver(vrings);
                Ok(())
            }
            KILL_EVENT => {
                let _ = self.kill.read();
                self.handle(vrings, Event::Kill);
                Ok(())
            }
            _ => Ok(()),
        };
        self.check_client_memory();
        self.publish_state();
        // An error returned here would end the vhost-user worker for good.
        if let Err(error) = result {
            tracing::warn!(device = %self.name, device_event, %error, "event handling failed");
        }
        Ok(())
    }
}
