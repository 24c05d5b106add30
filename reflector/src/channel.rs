//! The reflector's side of the channel into a driver VM (layout in
//! `guest_abi::channel`): it publishes requests, takes completions, and
//! decides when the driver needs an interrupt.
//!
//! Completions come out of driver-writable memory: this module only copies
//! them out and checks the ring indices; `driver_answers` judges them.

use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::Arc;

use guest_abi::channel::{self, header, CompletionEntry, RequestEntry};
use vm_memory::VolatileSlice;

use crate::driver_answers::Violation;
use crate::shm::SharedMemory;

/// The channel region and the reflector's private indices.
pub struct Channel {
    memory: Arc<SharedMemory>,
    generation: u32,
    req_prod: u32,
    cmp_cons: u32,
    /// Where the device sees the bounce slots ([`Channel::set_dma_address`]):
    /// kept here, since the copy in the header is driver-writable.
    dma_address: AtomicU64,
}

impl Channel {
    /// Creates the region for driver VM `name`, with the header filled in.
    pub fn new(name: &str) -> std::io::Result<Channel> {
        let memory = Arc::new(SharedMemory::new(&format!("{name}-channel"), channel::REGION_SIZE)?);
        memory.atomic_u32(header::GENERATION).store(1, Ordering::Release);
        let channel = Channel { memory, generation: 1, req_prod: 0, cmp_cons: 0, dma_address: AtomicU64::new(0) };
        channel.write_layout();
        Ok(channel)
    }

    /// Writes the fields every driver reads and none may change: the
    /// layout, where the device sees the bounce slots, and that the
    /// reflector waits for doorbells (its worker sleeps in epoll between
    /// events until it says otherwise).
    fn write_layout(&self) {
        self.memory.write(header::MAGIC, channel::MAGIC);
        self.memory.write(header::VERSION, channel::VERSION);
        self.memory.write(header::RING_SIZE, channel::RING_SIZE);
        self.memory.write(header::SLOT_SIZE, channel::SLOT_SIZE);
        self.memory.write(header::SLOT_COUNT, channel::SLOT_COUNT);
        self.memory.write(header::DMA_ADDRESS, self.dma_address.load(Ordering::Acquire));
        self.memory.atomic_u32(header::HOST_WAITING).store(1, Ordering::Release);
    }

    /// Starts a new generation for a new driver VM: empty rings, a new
    /// generation number (so a driver of another generation is detectable),
    /// and every field only the reflector writes written again (a driver
    /// that scribbled over the layout or the DMA address, and died, would
    /// otherwise have failed every successor's start, or pointed its
    /// device elsewhere). Only call it once the previous driver VM is dead.
    pub fn reset(&mut self) -> u32 {
        self.write_layout();
        self.memory.atomic_u32(header::DRIVER_GENERATION).store(0, Ordering::Release);
        self.generation = self.generation.wrapping_add(1);
        for offset in [
            header::REQ_PROD,
            header::REQ_CONS,
            header::CMP_PROD,
            header::CMP_CONS,
            header::DRIVER_SLEEPING,
            header::INJECT_KIND,
            header::INJECT_AFTER,
            header::DRIVER_INJECTABLE,
        ] {
            self.memory.atomic_u32(offset).store(0, Ordering::Release);
        }
        self.memory.atomic_u32(header::DRIVER_STATE).store(channel::driver_state::STARTING, Ordering::Release);
        self.memory.atomic_u32(header::GENERATION).store(self.generation, Ordering::Release);
        (self.req_prod, self.cmp_cons) = (0, 0);
        self.generation
    }

    /// Tells the driver where its device sees the bounce slots (a device
    /// behind its own address space, such as a QEMU model); kept across
    /// generations.
    pub fn set_dma_address(&self, address: u64) {
        self.dma_address.store(address, Ordering::Release);
        self.memory.write(header::DMA_ADDRESS, address);
    }

    /// The shared region (mapped into the driver VM as window `channel`).
    pub fn memory(&self) -> &Arc<SharedMemory> {
        &self.memory
    }

    /// The bounce slot for `slot`.
    pub fn slot(&self, slot: u32, len: usize) -> Option<VolatileSlice<'_>> {
        if slot >= channel::SLOT_COUNT || len > channel::SLOT_SIZE as usize {
            return None;
        }
        self.memory.slice(channel::slot_offset(slot), len)
    }

    /// Writes a request into the ring (visible to the driver after `publish`).
    /// The caller keeps at most RING_SIZE requests outstanding (one per slot).
    pub fn push(&mut self, request: RequestEntry) {
        let at =
            channel::REQUEST_RING_OFFSET + (self.req_prod % channel::RING_SIZE) as usize * channel::REQUEST_ENTRY_SIZE;
        self.memory.write(at, request);
        self.req_prod = self.req_prod.wrapping_add(1);
    }

    /// Makes pushed requests visible; whether the driver may be asleep (and
    /// must be woken: `DeviceCore::wake_sleeping_driver`).
    pub fn publish(&self) -> bool {
        self.memory.atomic_u32(header::REQ_PROD).store(self.req_prod, Ordering::Release);
        fence(Ordering::SeqCst);
        self.memory.atomic_u32(header::DRIVER_SLEEPING).load(Ordering::Acquire) != 0
    }

    /// Gives the bounce slots' pages back to the kernel. Only while no
    /// request holds a slot: they then hold stale data nobody reads.
    pub fn release_bounce_slots(&self) -> std::io::Result<()> {
        self.memory.release(channel::BOUNCE_OFFSET, channel::DEVICE_AREA_OFFSET - channel::BOUNCE_OFFSET)
    }

    /// Where the current generation's driver says it is in its start
    /// (`driver_state`), if it said anything for this generation.
    /// Untrusted: for figures, the hang deadline and blame only.
    pub fn driver_mark(&self) -> Option<u32> {
        Channel::driver_mark_in(&self.memory, self.generation)
    }

    /// [`Channel::driver_mark`] of the channel in `memory` for
    /// `generation` (the control socket holds the memory, not the channel,
    /// and reads the generation from its header).
    pub fn driver_mark_in(memory: &SharedMemory, generation: u32) -> Option<u32> {
        let read = |offset| memory.atomic_u32(offset).load(Ordering::Acquire);
        let (attached_to, state) = (read(header::DRIVER_GENERATION), read(header::DRIVER_STATE));
        (attached_to == generation && state != channel::driver_state::STARTING).then_some(state)
    }

    /// Whether the driver published completions not taken yet.
    pub fn completions_pending(&self) -> bool {
        self.memory.atomic_u32(header::CMP_PROD).load(Ordering::Acquire) != self.cmp_cons
    }

    /// Tells the driver whether the reflector waits for its doorbell
    /// (`true`: it sleeps in epoll) or is polling the completion ring
    /// (`false`: a doorbell would be a wasted exit). Fenced: a check of the
    /// ring that follows sees every completion published before a driver
    /// read the flag as `false`.
    pub fn set_host_waiting(&self, waiting: bool) {
        self.memory.atomic_u32(header::HOST_WAITING).store(u32::from(waiting), Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }

    /// Asks the driver to commit fault `kind` after `after` more requests
    /// (tests and the chaos command).
    pub fn inject(memory: &SharedMemory, kind: u32, after: u32) {
        memory.atomic_u32(header::INJECT_AFTER).store(after, Ordering::Release);
        memory.atomic_u32(header::INJECT_KIND).store(kind, Ordering::Release);
    }

    /// Checks the fields only the reflector writes; the driver writing them
    /// is a protocol violation.
    fn check_reflector_fields(&self) -> Result<(), Violation> {
        let dma_address = self.dma_address.load(Ordering::Acquire);
        for (field, offset, expected) in [
            ("request producer index", header::REQ_PROD, self.req_prod),
            ("completion consumer index", header::CMP_CONS, self.cmp_cons),
            ("generation", header::GENERATION, self.generation),
            ("magic number (low half)", header::MAGIC, channel::MAGIC as u32),
            ("magic number (high half)", header::MAGIC + 4, (channel::MAGIC >> 32) as u32),
            ("layout version", header::VERSION, channel::VERSION),
            ("ring size", header::RING_SIZE, channel::RING_SIZE),
            ("slot size", header::SLOT_SIZE, channel::SLOT_SIZE),
            ("slot count", header::SLOT_COUNT, channel::SLOT_COUNT),
            ("DMA address (low half)", header::DMA_ADDRESS, dma_address as u32),
            ("DMA address (high half)", header::DMA_ADDRESS + 4, (dma_address >> 32) as u32),
        ] {
            let found = self.memory.atomic_u32(offset).load(Ordering::Acquire);
            if found != expected {
                return Err(Violation::ForeignWrite { field, found, expected });
            }
        }
        Ok(())
    }

    /// Copies out every completion the driver published since the last call.
    pub fn take_completions(&mut self) -> Result<Vec<CompletionEntry>, Violation> {
        self.check_reflector_fields()?;
        let produced = self.memory.atomic_u32(header::CMP_PROD).load(Ordering::Acquire);
        let available = produced.wrapping_sub(self.cmp_cons);
        if available > self.req_prod.wrapping_sub(self.cmp_cons) {
            return Err(Violation::RingIndex { produced, consumed: self.cmp_cons, published: self.req_prod });
        }
        let mut completions = Vec::with_capacity(available as usize);
        while self.cmp_cons != produced {
            let at = channel::COMPLETION_RING_OFFSET
                + (self.cmp_cons % channel::RING_SIZE) as usize * channel::COMPLETION_ENTRY_SIZE;
            completions.push(self.memory.read(at).unwrap_or_default());
            self.cmp_cons = self.cmp_cons.wrapping_add(1);
        }
        self.memory.atomic_u32(header::CMP_CONS).store(self.cmp_cons, Ordering::Release);
        Ok(completions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(channel: &mut Channel, id: u64) {
        channel.push(RequestEntry {
            id,
            op: channel::op::READ,
            slot: channel::slot_of(id),
            sector: 0,
            len: 512,
            reserved: 0,
        });
        channel.publish();
    }

    #[test]
    fn completions_are_copied_out_and_indices_checked() {
        let mut channel = Channel::new("test").unwrap();
        publish(&mut channel, 7);
        let memory = channel.memory().clone();
        // The driver answers once.
        memory.write(channel::COMPLETION_RING_OFFSET, CompletionEntry { id: 7, status: 0, len: 512 });
        memory.atomic_u32(header::CMP_PROD).store(1, Ordering::SeqCst);
        assert_eq!(channel.take_completions().unwrap(), vec![CompletionEntry { id: 7, status: 0, len: 512 }]);
        assert!(channel.take_completions().unwrap().is_empty());
        // More completions than requests published.
        memory.atomic_u32(header::CMP_PROD).store(5, Ordering::SeqCst);
        assert!(matches!(channel.take_completions(), Err(Violation::RingIndex { .. })));
    }

    #[test]
    fn a_driver_writing_reflector_fields_is_caught_and_reset_starts_clean() {
        let mut channel = Channel::new("test").unwrap();
        publish(&mut channel, 3);
        let memory = channel.memory().clone();
        memory.atomic_u32(header::REQ_PROD).store(99, Ordering::SeqCst);
        assert!(matches!(
            channel.take_completions(),
            Err(Violation::ForeignWrite { field: "request producer index", .. })
        ));
        Channel::inject(&memory, channel::inject::PANIC, 4);
        let generation = channel.reset();
        assert_eq!(generation, 2);
        for offset in [header::REQ_PROD, header::CMP_PROD, header::INJECT_KIND, header::INJECT_AFTER] {
            assert_eq!(memory.atomic_u32(offset).load(Ordering::SeqCst), 0);
        }
        assert!(channel.take_completions().unwrap().is_empty());
        memory.atomic_u32(header::GENERATION).store(1, Ordering::SeqCst);
        assert!(matches!(channel.take_completions(), Err(Violation::ForeignWrite { field: "generation", .. })));
    }

    /// A driver that scribbles over the layout every driver checks, or the
    /// address its device sees the bounce slots at, and dies: before, the
    /// words stayed for every successor, which then refused the channel
    /// (the device failed for good) or pointed its device elsewhere.
    #[test]
    fn a_driver_scribbling_over_the_layout_is_caught_and_its_successor_finds_it_whole() {
        let mut channel = Channel::new("test").unwrap();
        channel.set_dma_address(0x1_0000_0000);
        let memory = channel.memory().clone();
        let layout = |memory: &SharedMemory| {
            (
                memory.read::<u64>(header::MAGIC).unwrap(),
                [header::VERSION, header::RING_SIZE, header::SLOT_SIZE, header::SLOT_COUNT, header::HOST_WAITING]
                    .map(|offset| memory.atomic_u32(offset).load(Ordering::SeqCst)),
                memory.read::<u64>(header::DMA_ADDRESS).unwrap(),
            )
        };
        let whole = layout(&memory);
        assert_eq!(whole.0, channel::MAGIC);
        assert_eq!(whole.2, 0x1_0000_0000);
        for (field, offset) in [
            ("magic number (low half)", header::MAGIC),
            ("slot size", header::SLOT_SIZE),
            ("DMA address (high half)", header::DMA_ADDRESS + 4),
        ] {
            memory.atomic_u32(offset).store(0x5a5a_5a5a, Ordering::SeqCst);
            match channel.take_completions() {
                Err(Violation::ForeignWrite { field: caught, .. }) => assert_eq!(caught, field),
                other => panic!("{field} overwritten, and {other:?}"),
            }
            channel.reset();
            assert_eq!(layout(&memory), whole, "{field}: the successor's channel is not whole");
            assert!(channel.take_completions().unwrap().is_empty());
        }
        memory.write(header::MAGIC, 0u64);
        memory.atomic_u32(header::HOST_WAITING).store(0, Ordering::SeqCst);
        channel.reset();
        assert_eq!(layout(&memory), whole);
    }
}
