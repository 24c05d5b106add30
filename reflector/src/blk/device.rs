//! The vhost-user-blk device: a `VhostUserBackendMut` whose requests are
//! served by a driver VM.
//!
//! Flow: the client kicks queue 0 → chains are parsed (`marshal`) → each
//! well-formed request takes a bounce slot and an id (`inflight`), a write's
//! payload is copied in, and the request is pushed into the channel → the
//! driver VM's doorbell wakes the worker → completions are judged
//! (`driver_answers`), a read's payload is copied out, and the chain is
//! completed in the client's used ring.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use guest_abi::channel::{self, RequestEntry};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};
use vmm_sys_util::eventfd::EventFd;

use super::inflight::{InFlight, InFlightTable};
use super::marshal::{self, BlkRequest, Limits, RequestKind, Segment};
use crate::channel::Channel;
use crate::driver_answers;

/// Queues offered to the client.
pub const NUM_QUEUES: usize = 1;
/// Largest queue a client may set up: QEMU's limit for vhost-user-blk. A
/// request uses up to SEG_MAX + 2 descriptors, so deep queues of large
/// requests need this many.
pub const QUEUE_SIZE: usize = 1024;
/// Epoll data for the driver VM's completion doorbell (ids up to
/// NUM_QUEUES are the library's).
pub const COMPLETION_EVENT: u16 = NUM_QUEUES as u16 + 1;
/// Epoll data for "the driver VM exited".
pub const DRIVER_EXIT_EVENT: u16 = NUM_QUEUES as u16 + 2;
/// Largest data segment advertised (size_max): one page, so that
/// `SEG_MAX` segments always fit one bounce slot.
const SIZE_MAX: u32 = 4096;
/// Most data segments per request (seg_max).
const SEG_MAX: u32 = channel::SLOT_SIZE / SIZE_MAX;

/// Counters, readable while the device runs.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Chains taken from the client.
    pub requests: AtomicU64,
    /// Chains completed.
    pub completed: AtomicU64,
    /// Chains refused as malformed.
    pub malformed: AtomicU64,
    /// Requests completed with an error status.
    pub errors: AtomicU64,
    /// Driver protocol violations seen.
    pub violations: AtomicU64,
    /// Bytes read for the client.
    pub bytes_read: AtomicU64,
    /// Bytes written for the client.
    pub bytes_written: AtomicU64,
}

/// A request waiting for a free bounce slot.
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
    acked_features: u64,
    event_idx: bool,
    memory: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    channel: Channel,
    in_flight: InFlightTable,
    waiting: VecDeque<Waiting>,
    driver_interrupt: EventFd,
    completion_doorbell: EventFd,
    driver_exited: EventFd,
    failed: Option<String>,
    metrics: Arc<Metrics>,
}

/// What a device is wired to.
pub struct BlkWiring {
    /// The channel into the driver VM.
    pub channel: Channel,
    /// Raises the driver VM's request interrupt (its line 0).
    pub driver_interrupt: EventFd,
    /// Signalled by the driver VM's completion doorbell (its doorbell 0).
    pub completion_doorbell: EventFd,
    /// Signalled when the driver VM process exits.
    pub driver_exited: EventFd,
}

impl BlkDevice {
    /// A device of `capacity_sectors` served through `wiring`.
    pub fn new(name: &str, capacity_sectors: u64, read_only: bool, wiring: BlkWiring) -> Self {
        let limits =
            Limits { capacity_sectors, max_data: channel::SLOT_SIZE, max_segments: SEG_MAX as usize, read_only };
        BlkDevice {
            name: name.to_owned(),
            limits,
            config: virtio_blk_config(capacity_sectors),
            acked_features: 0,
            event_idx: false,
            memory: None,
            channel: wiring.channel,
            in_flight: InFlightTable::default(),
            waiting: VecDeque::new(),
            driver_interrupt: wiring.driver_interrupt,
            completion_doorbell: wiring.completion_doorbell,
            driver_exited: wiring.driver_exited,
            failed: None,
            metrics: Arc::new(Metrics::default()),
        }
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The eventfds the vhost-user worker must watch, with their event ids.
    pub fn listeners(&self) -> [(&EventFd, u16); 2] {
        [(&self.completion_doorbell, COMPLETION_EVENT), (&self.driver_exited, DRIVER_EXIT_EVENT)]
    }

    /// Forgets a client that went away: its queues are gone, so requests
    /// still in the driver VM complete into nothing.
    pub fn client_gone(&mut self) {
        self.waiting.clear();
        self.memory = None;
    }

    fn process_queue(&mut self, vring: &VringRwLock) -> std::io::Result<()> {
        let Some(atomic) = self.memory.clone() else { return Ok(()) };
        let memory = atomic.memory();
        loop {
            if self.event_idx {
                vring.disable_notification().map_err(std::io::Error::other)?;
            }
            let chains: Vec<(u16, Vec<Segment>)> = {
                let mut state = vring.get_mut();
                let mut chains = Vec::new();
                while let Some(chain) = state.get_queue_mut().pop_descriptor_chain(memory.clone()) {
                    let head = chain.head_index();
                    let segments = chain
                        .take(SEG_MAX as usize + 3)
                        .map(|d| Segment { addr: d.addr(), len: d.len(), writable: d.is_write_only() })
                        .collect();
                    chains.push((head, segments));
                }
                chains
            };
            for (head, segments) in chains {
                self.accept(vring, &memory, head, &segments);
            }
            if !self.event_idx || !vring.enable_notification().map_err(std::io::Error::other)? {
                break;
            }
        }
        self.channel.publish(&self.driver_interrupt);
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
            _ if self.failed.is_some() => {
                self.complete(vring, memory, head, Some(status), marshal::VIRTIO_BLK_S_IOERR, 0);
            }
            _ => {
                self.waiting.push_back(Waiting { head, request, status });
                self.submit_waiting(vring, memory);
            }
        }
    }

    /// Moves waiting requests into free bounce slots and the channel.
    fn submit_waiting(&mut self, vring: &VringRwLock, memory: &GuestMemoryMmap) {
        while let Some(waiting) = self.waiting.pop_front() {
            let data_len = waiting.request.data_len();
            let entry =
                InFlight { id: 0, head: waiting.head, request: waiting.request, data_len, status: waiting.status };
            let (slot, id) = match self.in_flight.insert(entry) {
                Ok(taken) => taken,
                Err(InFlight { head, request, status, .. }) => {
                    self.waiting.push_front(Waiting { head, request, status });
                    return;
                }
            };
            let Some(entry) = self.in_flight.get(slot) else { continue };
            let request = &entry.request;
            let op = match request.kind {
                RequestKind::Read => channel::op::READ,
                RequestKind::Write => channel::op::WRITE,
                _ => channel::op::FLUSH,
            };
            if request.kind == RequestKind::Write {
                let copied = self
                    .channel
                    .slot(slot, data_len as usize)
                    .map(|bounce| marshal::copy_to_slot(memory, request, &bounce));
                if !matches!(copied, Some(Ok(()))) {
                    if let Some(entry) = self.in_flight.remove(slot) {
                        self.complete(vring, memory, entry.head, Some(entry.status), marshal::VIRTIO_BLK_S_IOERR, 0);
                    }
                    continue;
                }
            }
            let sector = request.sector;
            self.channel.push(RequestEntry { id, op, slot, sector, len: data_len, reserved: 0 });
        }
    }

    fn process_completions(&mut self, vring: &VringRwLock) -> std::io::Result<()> {
        let Some(atomic) = self.memory.clone() else {
            // No client: drop whatever the driver finished.
            if let Ok(completions) = self.channel.take_completions() {
                for completion in completions {
                    self.in_flight.remove(channel::slot_of(completion.id));
                }
            }
            return Ok(());
        };
        let memory = atomic.memory();
        let completions = match self.channel.take_completions() {
            Ok(completions) => completions,
            Err(violation) => {
                self.driver_faulted(vring, &memory, violation.to_string());
                return signal_used(vring);
            }
        };
        for completion in completions {
            match driver_answers::check(&completion, &self.in_flight) {
                Ok(answer) => {
                    if let Some(entry) = self.in_flight.remove(answer.slot) {
                        self.finish(vring, &memory, answer.slot, entry, answer.status);
                    }
                }
                Err(violation) => {
                    self.metrics.violations.fetch_add(1, Ordering::Relaxed);
                    self.driver_faulted(vring, &memory, violation.to_string());
                    return signal_used(vring);
                }
            }
        }
        self.submit_waiting(vring, &memory);
        self.channel.publish(&self.driver_interrupt);
        signal_used(vring)
    }

    fn finish(&mut self, vring: &VringRwLock, memory: &GuestMemoryMmap, slot: u32, entry: InFlight, status: u32) {
        let code = match status {
            channel::status::OK => marshal::VIRTIO_BLK_S_OK,
            channel::status::UNSUPPORTED => marshal::VIRTIO_BLK_S_UNSUPP,
            _ => marshal::VIRTIO_BLK_S_IOERR,
        };
        let mut written = 0;
        let code = match (code, entry.request.kind) {
            (marshal::VIRTIO_BLK_S_OK, RequestKind::Read) => {
                let copied = self
                    .channel
                    .slot(slot, entry.data_len as usize)
                    .map(|bounce| marshal::copy_from_slot(memory, &entry.request, &bounce));
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

    /// The driver VM can no longer be trusted with this device's requests.
    /// Until restarts exist, the device fails: every pending and later
    /// request completes with an I/O error, so no client ever hangs.
    fn driver_faulted(&mut self, vring: &VringRwLock, memory: &GuestMemoryMmap, reason: String) {
        tracing::error!(device = %self.name, %reason, "driver VM fault: failing the device's requests");
        self.failed = Some(reason);
        for (_, entry) in self.in_flight.drain() {
            self.complete(vring, memory, entry.head, Some(entry.status), marshal::VIRTIO_BLK_S_IOERR, 0);
        }
        while let Some(waiting) = self.waiting.pop_front() {
            self.complete(vring, memory, waiting.head, Some(waiting.status), marshal::VIRTIO_BLK_S_IOERR, 0);
        }
    }
}

fn signal_used(vring: &VringRwLock) -> std::io::Result<()> {
    if vring.needs_notification().map_err(std::io::Error::other)? {
        vring.signal_used_queue()?;
    }
    Ok(())
}

/// The virtio-blk configuration space (virtio spec 5.2.4), up to num_queues.
fn virtio_blk_config(capacity_sectors: u64) -> Vec<u8> {
    let mut config = vec![0u8; 36];
    config[0..8].copy_from_slice(&capacity_sectors.to_le_bytes());
    config[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
    config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
    config[20..24].copy_from_slice(&512u32.to_le_bytes()); // blk_size
    config[34..36].copy_from_slice(&(NUM_QUEUES as u16).to_le_bytes());
    config
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

    fn acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let start = (offset as usize).min(self.config.len());
        let end = start.saturating_add(size as usize).min(self.config.len());
        let mut bytes = self.config[start..end].to_vec();
        bytes.resize(size as usize, 0);
        bytes
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
        self.memory = Some(memory);
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
        match device_event {
            COMPLETION_EVENT => {
                let _ = self.completion_doorbell.read();
                self.process_completions(vring)
            }
            DRIVER_EXIT_EVENT => {
                let _ = self.driver_exited.read();
                if let Some(atomic) = self.memory.clone() {
                    self.driver_faulted(vring, &atomic.memory(), "the driver VM exited".into());
                    signal_used(vring)?;
                } else {
                    self.failed = Some("the driver VM exited".into());
                }
                Ok(())
            }
            0 => self.process_queue(vring),
            _ => Ok(()),
        }
    }
}
