//! The net kind of device (`crate::device`): a vhost-user-net device whose
//! frames a driver VM moves by driving a network card.
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
//! What recovery means for net (DESIGN.md, restart protocol): on a fault the driver VM is killed and the card
//! quiesced, valid answers are kept, frames the dead driver was sending are
//! lost (at most once: never sent again), received frames not yet delivered
//! are kept, and a new driver VM resets the card. The link the client sees
//! stays up throughout: it is the card's carrier, not the driver's state.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crate::client_vring::ClientVring;
use guest_abi::channel::{self, RequestEntry};
use vhost::vhost_user::message::VhostUserVirtioFeatures;
use vhost_user_backend::VringT;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;

use super::marshal::{self, Malformed, Segment};
use super::slots::{self, NetAnswer, NetSlots, SlotState};
use crate::device::{Device, DeviceCore, DeviceKind};
use crate::hw::NetHardware;
use crate::recovery::Fault;
use crate::session::Lifecycle;
use crate::worker::{exceeds_queue, HEAD_REUSED};

/// Queues offered to the client: one receive/transmit pair.
pub const NUM_QUEUES: usize = 2;
/// Largest queue a client may set up (QEMU's limit for vhost-user-net).
pub const QUEUE_SIZE: usize = 1024;
/// Longest descriptor chain read: a frame of at most MAX_FRAME bytes plus
/// its header needs no more, whatever the client's buffer sizes.
const MAX_CHAIN: usize = guest_abi::nic::MAX_FRAME as usize + virtio::net::HEADER_LEN;

/// A client receive chain waiting for a frame.
struct RxBuffer {
    head: u16,
    segments: Vec<Segment>,
    capacity: u32,
}

/// A net device served through a driver VM.
pub type NetDevice = Device<Net>;

/// What only a net device has.
pub struct Net {
    hardware: Arc<dyn NetHardware>,
    mergeable: bool,
    slots: NetSlots,
    /// RX slots holding frames, oldest first.
    held: VecDeque<u32>,
    /// Client receive chains taken from its queue, oldest first.
    rx_buffers: VecDeque<RxBuffer>,
    /// Receive buffers the driver answered with an error this watch period
    /// and that were posted again at once (at most [`RX_ERRORS_AT_ONCE`]).
    rx_errors_reposted: u32,
}

/// Receive buffers answered with an error that are posted again at once in
/// a watch period; past that they cool until the next
/// (`SlotState::RxCooling`). As many as a driver holds: an honest driver
/// whose card reports a bad frame now and then never waits for a buffer,
/// and one that fails them all in a loop gets two rounds a period.
const RX_ERRORS_AT_ONCE: u32 = crate::net::slots::RX_SLOTS;

impl Net {
    /// The net side of a device on the card `hardware`.
    pub fn new(hardware: Arc<dyn NetHardware>) -> Self {
        Net {
            hardware,
            mergeable: false,
            slots: NetSlots::default(),
            held: VecDeque::new(),
            rx_buffers: VecDeque::new(),
            rx_errors_reposted: 0,
        }
    }

    /// Posts every idle RX slot to the driver, while one runs.
    fn post_rx_buffers(&mut self, core: &mut DeviceCore) {
        if !core.session.running() {
            return;
        }
        let posted = self.slots.post_idle_rx();
        if posted.is_empty() {
            return;
        }
        for (slot, id) in posted {
            let len = channel::SLOT_SIZE.min(guest_abi::nic::MAX_FRAME);
            core.channel.push(RequestEntry { id, op: channel::op::NET_RX, slot, sector: 0, len, reserved: 0 });
        }
        core.publish();
    }

    /// Takes the client's transmit chains while TX slots are free (or drops
    /// them while the device has failed, or discards them while the client
    /// has the queue disabled); a queue's worth at most
    /// ([`crate::worker::ChainBudget`]).
    fn process_tx(&mut self, core: &mut DeviceCore, tx: &ClientVring) -> std::io::Result<()> {
        let Some(memory) = core.memory.clone() else { return Ok(()) };
        if !tx.get_ref().get_queue().ready() {
            return Ok(());
        }
        // A disabled queue's frames are discarded, never sent (vhost-user);
        // before, they went out whenever an answer came.
        let enabled = crate::worker::queue_enabled(tx);
        let takes = |net: &Net, core: &DeviceCore| !enabled || net.can_take_tx(core);
        let mut sent = false;
        let mut budget = crate::worker::ChainBudget::of(tx);
        for pass in 0.. {
            // What an earlier pass sent goes out (unpublished, the driver
            // would be blamed for it).
            if !core.queue_servable(tx, &memory) {
                break;
            }
            if core.event_idx && !core.quiet_client(tx, &memory) {
                break;
            }
            let mut taken = 0;
            while takes(self, core) && budget.left() > 0 {
                let Some((head, segments)) = pop_chain(tx, &memory) else { break };
                budget.took(1);
                if enabled {
                    sent |= self.transmit(core, &memory, head, segments.as_deref());
                } else {
                    core.metrics.tx_lost.fetch_add(1, Ordering::Relaxed);
                }
                core.add_used(tx, &memory, head, 0);
                taken += 1;
            }
            if budget.spent(tx) {
                break;
            }
            if pass > 0 && taken == 0 && takes(self, core) {
                core.stuck_pass(tx);
                break;
            }
            // Chains left while no slot (or no driver VM) can take them wait
            // for a completion or a restart, not for a kick.
            if !takes(self, core) || !core.event_idx || !core.rearm_client(tx, &memory) {
                break;
            }
        }
        if sent {
            core.publish();
            core.arm_hang_watch(self.slots.tx_in_flight());
        }
        Ok(())
    }

    /// Whether transmit chains can be taken now: into a free TX slot of a
    /// running driver VM, or dropped while the device has failed.
    fn can_take_tx(&self, core: &DeviceCore) -> bool {
        match core.session.state() {
            Lifecycle::Running { .. } => self.slots.tx_available(),
            Lifecycle::Failed { .. } => true,
            Lifecycle::Restarting { .. } | Lifecycle::BackingOff { .. } => false,
        }
    }

    /// Copies one transmit chain's frame into a TX slot and the channel;
    /// false if it was dropped (malformed, or the device failed).
    fn transmit(
        &mut self,
        core: &mut DeviceCore,
        memory: &GuestMemoryMmap,
        head: u16,
        segments: Result<&[Segment], &Malformed>,
    ) -> bool {
        let checked = segments.map_err(Malformed::clone).and_then(|s| Ok((s, marshal::tx_frame_len(memory, s)?)));
        let (segments, len) = match checked {
            Ok(checked) => checked,
            Err(reason) => {
                core.metrics.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(device = %core.name, head, %reason, "malformed transmit chain dropped");
                return false;
            }
        };
        if core.session.failed() {
            core.metrics.tx_lost.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let Some((slot, id)) = self.slots.start_tx(len) else { return false };
        let copied =
            core.channel.slot(slot, len as usize).map(|bounce| marshal::copy_tx_frame(memory, segments, &bounce));
        // A fault while copying left zeros, not the client's frame.
        if !matches!(copied, Some(Ok(_))) || core.client_memory_poisoned() {
            self.slots.release(slot);
            core.metrics.malformed.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        core.request_arrived();
        // The card may send each frame once (never a duplicate), and no
        // more (`hw::WorkAllowance`).
        if let Some(allowance) = self.hardware.work() {
            allowance.grant(u64::from(len) + crate::hw::COMMAND_WORK);
        }
        core.channel.push(RequestEntry { id, op: channel::op::NET_TX, slot, sector: 0, len, reserved: 0 });
        core.metrics.tx_frames.fetch_add(1, Ordering::Relaxed);
        core.metrics.tx_bytes.fetch_add(u64::from(len), Ordering::Relaxed);
        true
    }

    /// Takes every receive chain the client offers (a queue's worth at most
    /// an event, none while it is disabled), then delivers held frames.
    fn process_rx(&mut self, core: &mut DeviceCore, rx: &ClientVring) -> std::io::Result<()> {
        let Some(memory) = core.memory.clone() else { return Ok(()) };
        // A disabled queue's chains stay in its ring: no frame may be
        // written into them.
        if !crate::worker::queue_enabled(rx) {
            return Ok(());
        }
        let mut budget = crate::worker::ChainBudget::of(rx);
        for pass in 0.. {
            if !core.queue_servable(rx, &memory) {
                return Ok(());
            }
            if core.event_idx && !core.quiet_client(rx, &memory) {
                break;
            }
            let mut taken = 0;
            while budget.left() > 0 {
                let Some((head, segments)) = pop_chain(rx, &memory) else { break };
                budget.took(1);
                taken += 1;
                if exceeds_queue(rx, self.rx_buffers.len()) {
                    core.metrics.malformed.fetch_add(1, Ordering::Relaxed);
                    core.cut_off(HEAD_REUSED);
                    return Ok(());
                }
                match segments.and_then(|segments| marshal::rx_capacity(&memory, &segments).map(|c| (segments, c))) {
                    Ok((segments, capacity)) => self.rx_buffers.push_back(RxBuffer { head, segments, capacity }),
                    Err(reason) => {
                        core.metrics.malformed.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(device = %core.name, head, %reason, "malformed receive chain returned unused");
                        core.add_used(rx, &memory, head, 0);
                    }
                }
            }
            if budget.spent(rx) {
                break;
            }
            if pass > 0 && taken == 0 {
                if core.stuck_pass(rx) {
                    return Ok(());
                }
                break;
            }
            if !core.event_idx || !core.rearm_client(rx, &memory) {
                break;
            }
        }
        self.deliver_held(core, rx, &memory);
        Ok(())
    }

    /// Writes held frames into the client's receive chains, oldest first,
    /// and posts the freed slots again.
    fn deliver_held(&mut self, core: &mut DeviceCore, rx: &ClientVring, memory: &GuestMemoryMmap) {
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
                core.metrics.rx_dropped.fetch_add(1, Ordering::Relaxed);
                self.slots.release(slot);
                continue;
            }
            let segments: Vec<Vec<Segment>> = chains.iter().map(|c| c.segments.clone()).collect();
            let written =
                core.channel.slot(slot, len as usize).map(|frame| marshal::write_rx_frame(memory, &segments, &frame));
            self.slots.release(slot);
            let used = match written {
                Some(Ok(used)) => {
                    core.metrics.rx_frames.fetch_add(1, Ordering::Relaxed);
                    core.metrics.rx_bytes.fetch_add(u64::from(len), Ordering::Relaxed);
                    used
                }
                _ => {
                    core.metrics.rx_dropped.fetch_add(1, Ordering::Relaxed);
                    vec![0; chains.len()]
                }
            };
            for (chain, used) in chains.iter().zip(used) {
                core.add_used(rx, memory, chain.head, used);
            }
        }
        self.post_rx_buffers(core);
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

    /// Takes a checked answer of the driver VM.
    fn take_answer(&mut self, core: &mut DeviceCore, answer: NetAnswer, salvaging: bool) {
        if !salvaging {
            core.progress();
            // A net device replays nothing: its failover ends here.
            core.drained();
        }
        match answer {
            NetAnswer::Sent { slot, sent } => {
                if !sent {
                    core.metrics.errors.fetch_add(1, Ordering::Relaxed);
                }
                core.note_busy();
                self.slots.release(slot);
            }
            NetAnswer::Received { slot, len: Some(len) } => {
                core.note_busy();
                self.slots.hold(slot, len);
                self.held.push_back(slot);
            }
            // No sign the driver had work: past a few, the buffer cools
            // until the next watch period (`SlotState::RxCooling`).
            NetAnswer::Received { slot, len: None } => {
                core.metrics.errors.fetch_add(1, Ordering::Relaxed);
                if self.rx_errors_reposted < RX_ERRORS_AT_ONCE {
                    self.rx_errors_reposted += 1;
                    self.slots.release(slot);
                } else {
                    self.slots.cool(slot);
                }
            }
        }
    }

    /// Judges and takes the driver VM's answers; false at the first that
    /// fails a check (reported as a fault unless `salvaging`).
    fn take_answers(&mut self, core: &mut DeviceCore, salvaging: bool) -> bool {
        let Some(completions) = core.take_completions(salvaging) else { return false };
        for completion in completions {
            match slots::check_net(&completion, &self.slots) {
                Ok(answer) => self.take_answer(core, answer, salvaging),
                Err(violation) => {
                    if !salvaging {
                        core.fault(Fault::Violation(violation.to_string()));
                    }
                    return false;
                }
            }
        }
        true
    }

    /// After answers: deliver frames, send what waited for slots.
    fn after_answers(&mut self, core: &mut DeviceCore, vrings: &[ClientVring]) -> std::io::Result<()> {
        let (Some(rx), Some(tx)) = (vrings.get(virtio::net::RX_QUEUE), vrings.get(virtio::net::TX_QUEUE)) else {
            self.post_rx_buffers(core);
            return Ok(());
        };
        // Frames for a disabled queue wait in their slots (the card drops
        // what comes once the slots are full) until it is enabled again.
        match core.memory.clone() {
            Some(memory) if crate::worker::queue_enabled(rx) => self.deliver_held(core, rx, &memory),
            _ => self.post_rx_buffers(core),
        }
        self.process_tx(core, tx)
    }
}

impl DeviceKind for Net {
    const QUEUES: usize = NUM_QUEUES;
    const MAX_QUEUE_SIZE: usize = QUEUE_SIZE;

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
        tracing::debug!(features = format_args!("{features:#x}"), mergeable = self.mergeable, "client features");
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

    fn work(&self) -> Option<crate::driver_watch::DeviceWork> {
        self.hardware.work().map(crate::driver_watch::DeviceWork::of)
    }

    fn in_driver(&self) -> usize {
        self.slots.tx_in_flight()
    }

    fn watched(&mut self, core: &mut DeviceCore) {
        self.rx_errors_reposted = 0;
        if self.slots.warm() > 0 {
            self.post_rx_buffers(core);
        }
    }

    fn oldest_in_driver(&self) -> Option<Instant> {
        self.slots.oldest_tx()
    }

    fn idle(&self) -> bool {
        self.slots.tx_in_flight() == 0
    }

    fn queue_kicked(&mut self, core: &mut DeviceCore, queue: usize, vrings: &[ClientVring]) -> std::io::Result<()> {
        match (queue, vrings.get(queue)) {
            (virtio::net::RX_QUEUE, Some(rx)) => self.process_rx(core, rx),
            (virtio::net::TX_QUEUE, Some(tx)) => self.process_tx(core, tx),
            _ => Ok(()),
        }
    }

    fn completions(&mut self, core: &mut DeviceCore, vrings: &[ClientVring]) -> std::io::Result<()> {
        if !self.take_answers(core, false) {
            return Ok(());
        }
        self.after_answers(core, vrings)
    }

    fn retired(&mut self, core: &mut DeviceCore, _vrings: &[ClientVring], _fault: &Fault) {
        self.take_answers(core, true);
        // Frames it was sending are lost: never sent twice.
        let lost = self.slots.driver_gone();
        core.metrics.tx_lost.fetch_add(lost, Ordering::Relaxed);
    }

    fn launched(&mut self, core: &mut DeviceCore, vrings: &[ClientVring]) {
        if let Err(error) = self.after_answers(core, vrings) {
            tracing::warn!(device = %core.name, %error, "resuming the queues after a restart failed");
        }
    }

    fn fail_pending(&mut self, core: &mut DeviceCore, vrings: &[ClientVring]) {
        if let Some(tx) = vrings.get(virtio::net::TX_QUEUE) {
            let _ = self.process_tx(core, tx);
        }
    }

    /// The receive chains taken from a stopped RX queue go back to it
    /// unused (length 0), now, while its ring is still the one they came
    /// from: kept, they would take frames after a reboot, written where
    /// the old kernel's buffers were, into the next kernel's memory, and
    /// put their heads in the new ring. Returned, the ring's state is
    /// whole again for a client that starts it again as it was.
    fn queue_stopped(&mut self, core: &mut DeviceCore, queue: usize, vrings: &[ClientVring]) {
        if queue != virtio::net::RX_QUEUE || self.rx_buffers.is_empty() {
            return;
        }
        let returned = self.rx_buffers.len();
        match (vrings.get(queue), core.memory.clone()) {
            (Some(rx), Some(memory)) => {
                for buffer in self.rx_buffers.drain(..) {
                    core.add_used(rx, &memory, buffer.head, 0);
                }
            }
            _ => self.rx_buffers.clear(),
        }
        tracing::debug!(device = %core.name, returned, "receive queue stopped: its buffers returned unused");
    }

    fn client_gone(&mut self, core: &mut DeviceCore) {
        self.rx_buffers.clear();
        core.metrics.rx_dropped.fetch_add(self.held.len() as u64, Ordering::Relaxed);
        for slot in self.held.drain(..) {
            self.slots.release(slot);
        }
        self.post_rx_buffers(core);
    }
}

/// Pops one chain with its descriptors (at most MAX_CHAIN bytes' worth are
/// kept: a longer chain is refused by `marshal` for its length anyway).
fn pop_chain(vring: &ClientVring, memory: &GuestMemoryMmap) -> Option<(u16, Result<Vec<Segment>, Malformed>)> {
    let mut state = vring.get_mut();
    let chain = state.get_queue_mut().pop_descriptor_chain(memory)?;
    let head = chain.head_index();
    Some((head, marshal::chain_segments(chain, MAX_CHAIN + virtio::net::HEADER_LEN)))
}
