//! A submission queue and its completion queue, in DMA memory.

use core::sync::atomic::{fence, Ordering};

use crate::command::{Completion, Submission};
use crate::{regs, DmaMemory, Registers};

/// Bytes of a submission entry (CC.IOSQES = 6).
pub const SQ_ENTRY: usize = 64;
/// Bytes of a completion entry (CC.IOCQES = 4).
pub const CQ_ENTRY: usize = 16;

/// A queue pair: the host's view of its indices.
#[derive(Clone, Debug)]
pub struct QueuePair {
    id: u16,
    depth: u16,
    sq: usize,
    cq: usize,
    stride: usize,
    /// Next submission slot.
    tail: u16,
    /// The tail the controller was last told.
    rung: u16,
    /// Next completion slot.
    head: u16,
    /// The phase a new completion carries.
    phase: bool,
    /// Commands submitted and not completed.
    outstanding: u16,
    /// The head the completion doorbell register was last written with.
    released: u16,
    /// Completions were taken since the register was last written.
    taken: bool,
    /// Where each new index is written before its register.
    mirror: Option<Mirror>,
    /// The controller's EventIdx entries, if it took the shadow doorbell
    /// buffer (the mirror is then its shadow doorbells).
    events: Option<Events>,
}

/// Where a queue pair's doorbell values are kept in memory (DMA offsets):
/// its shadow doorbells (NVMe 1.4 section 5.8: Doorbell Buffer Config),
/// which a host-side supervisor also reads for a doorbell it receives
/// without its value (a trapped window's posted register).
#[derive(Clone, Copy, Debug)]
struct Mirror {
    sq_tail: usize,
    cq_head: usize,
}

/// Where the controller says which index it wants to hear about: the
/// driver writes the register only when a move passes it (it then reads
/// the shadow itself), as virtio's event index works.
#[derive(Clone, Copy, Debug)]
struct Events {
    sq_event: usize,
    cq_event: usize,
}

/// Whether moving an index from `old` to `new` passes `event` (the index
/// the controller wants to hear about), in 16-bit wrapping arithmetic: a
/// wrap of the queue looks like a long move and always rings.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

impl QueuePair {
    /// Queue `id` of `depth` entries, its rings at `sq` and `cq` (offsets
    /// in DMA memory, zeroed by the caller), doorbells `stride` apart.
    pub fn new(id: u16, depth: u16, sq: usize, cq: usize, stride: usize) -> Self {
        QueuePair {
            id,
            depth,
            sq,
            cq,
            stride,
            tail: 0,
            rung: 0,
            head: 0,
            phase: true,
            outstanding: 0,
            released: 0,
            taken: false,
            mirror: None,
            events: None,
        }
    }

    /// Their offsets from the start of a doorbell page.
    fn doorbell_offsets(&self) -> (usize, usize) {
        let sq = regs::sq_tail_doorbell(self.id, self.stride) - regs::DOORBELLS;
        let cq = regs::cq_head_doorbell(self.id, self.stride) - regs::DOORBELLS;
        (sq, cq)
    }

    /// Writes each new index into the doorbell page at DMA offset
    /// `doorbells` (zeroed by the caller) before its register, whether or
    /// not the controller reads it there.
    pub fn use_mirror(&mut self, doorbells: usize) {
        let (sq, cq) = self.doorbell_offsets();
        self.mirror = Some(Mirror { sq_tail: doorbells + sq, cq_head: doorbells + cq });
    }

    /// Uses the shadow doorbell buffer at DMA offset `doorbells` and the
    /// EventIdx buffer at `events` (zeroed pages the controller was told).
    pub fn use_shadow(&mut self, doorbells: usize, events: usize) {
        self.use_mirror(doorbells);
        let (sq, cq) = self.doorbell_offsets();
        self.events = Some(Events { sq_event: events + sq, cq_event: events + cq });
    }

    /// Writes the current indices into the shadow doorbells (when they
    /// are first used, the controller reads them from there).
    pub fn sync_shadow(&self, memory: &impl DmaMemory) {
        if let Some(mirror) = self.mirror {
            memory.write(mirror.sq_tail, &u32::from(self.tail).to_le_bytes());
            memory.write(mirror.cq_head, &u32::from(self.head).to_le_bytes());
            fence(Ordering::SeqCst);
        }
    }

    /// Publishes `value` (moved from `old`) in the mirror at `at`;
    /// whether the register must be written too: unless the controller's
    /// EventIdx at `event` says it need not hear of this move.
    fn publish(memory: &impl DmaMemory, at: Option<usize>, event: Option<usize>, value: u16, old: u16) -> bool {
        if let Some(at) = at {
            memory.write(at, &u32::from(value).to_le_bytes());
        }
        let Some(event) = event else {
            // The mirror is in memory before the register is written (a
            // supervisor reads it once it sees the write).
            fence(Ordering::SeqCst);
            return true;
        };
        // The shadow is written before the EventIdx is read (a full
        // barrier: a store then a load).
        fence(Ordering::SeqCst);
        let mut bytes = [0u8; 4];
        memory.read(event, &mut bytes);
        need_event(u32::from_le_bytes(bytes) as u16, value, old)
    }

    /// Whether another command fits (one entry always stays empty).
    pub fn has_room(&self) -> bool {
        self.outstanding + 1 < self.depth
    }

    /// Commands submitted and not completed.
    pub fn outstanding(&self) -> u16 {
        self.outstanding
    }

    /// Writes `command` into the next submission slot; the controller
    /// sees it after [`QueuePair::ring`]. False if the queue is full.
    pub fn push(&mut self, memory: &impl DmaMemory, command: &Submission) -> bool {
        if !self.has_room() {
            return false;
        }
        memory.write(self.sq + usize::from(self.tail) * SQ_ENTRY, &command.to_bytes());
        self.tail = (self.tail + 1) % self.depth;
        self.outstanding += 1;
        true
    }

    /// Tells the controller about new submissions, if any: one doorbell
    /// write per burst.
    pub fn ring(&mut self, registers: &impl Registers, memory: &impl DmaMemory) {
        if self.tail != self.rung {
            // The entries must be in memory before the controller looks.
            fence(Ordering::SeqCst);
            let needed = Self::publish(
                memory,
                self.mirror.map(|m| m.sq_tail),
                self.events.map(|e| e.sq_event),
                self.tail,
                self.rung,
            );
            if needed {
                registers.write32(regs::sq_tail_doorbell(self.id, self.stride), u32::from(self.tail));
            }
            self.rung = self.tail;
        }
    }

    /// The next completion, if the controller posted one.
    pub fn pop(&mut self, memory: &impl DmaMemory) -> Option<Completion> {
        let at = self.cq + usize::from(self.head) * CQ_ENTRY;
        let mut bytes = [0u8; CQ_ENTRY];
        memory.read(at, &mut bytes);
        if Completion::from_bytes(&bytes).phase != self.phase {
            return None;
        }
        // The rest of the entry is read after its phase tag.
        fence(Ordering::Acquire);
        memory.read(at, &mut bytes);
        self.head += 1;
        if self.head == self.depth {
            self.head = 0;
            self.phase = !self.phase;
        }
        self.outstanding = self.outstanding.saturating_sub(1);
        self.taken = true;
        Some(Completion::from_bytes(&bytes))
    }

    /// Whether the next completion slot holds a new completion.
    pub fn posted(&self, memory: &impl DmaMemory) -> bool {
        let mut bytes = [0u8; CQ_ENTRY];
        memory.read(self.cq + usize::from(self.head) * CQ_ENTRY, &mut bytes);
        Completion::from_bytes(&bytes).phase == self.phase
    }

    /// Tells the controller the completions taken so far may be reused.
    ///
    /// The register is written even when the EventIdx would let the shadow
    /// alone do: a pin-based (INTx) interrupt is deasserted only by that
    /// write, and a line left asserted gives the next completion no new
    /// edge, so a sleeping driver would never hear of it.
    pub fn release(&mut self, registers: &impl Registers, memory: &impl DmaMemory) {
        Self::publish(
            memory,
            self.mirror.map(|m| m.cq_head),
            self.events.map(|e| e.cq_event),
            self.head,
            self.released,
        );
        registers.write32(regs::cq_head_doorbell(self.id, self.stride), u32::from(self.head));
        self.released = self.head;
        self.taken = false;
    }

    /// Tells the controller the completions taken so far may be reused,
    /// through its shadow doorbell alone when it reads them there (it
    /// reads the head before it posts each completion), else by the
    /// register. The shadow leaves a pin-based interrupt asserted: a
    /// driver that polls needs no new edge, and one about to sleep calls
    /// [`QueuePair::release_taken`] first.
    pub fn publish_head(&mut self, registers: &impl Registers, memory: &impl DmaMemory) {
        match (self.events, self.mirror) {
            (Some(_), Some(mirror)) => {
                memory.write(mirror.cq_head, &u32::from(self.head).to_le_bytes());
                fence(Ordering::SeqCst);
            }
            _ => self.release(registers, memory),
        }
    }

    /// [`QueuePair::release`], if completions were taken since the
    /// register was last written: once per batch, never twice for one
    /// (a controller may count each write that finds its queue empty, as
    /// QEMU's does for its INTx level), and even when the head has come
    /// round to the value last written.
    pub fn release_taken(&mut self, registers: &impl Registers, memory: &impl DmaMemory) {
        if self.taken {
            self.release(registers, memory);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{need_event, QueuePair, CQ_ENTRY};
    use crate::command::Submission;
    use crate::{regs, DmaMemory, Registers};
    use core::cell::{Cell, RefCell};

    /// DMA memory: 16 KiB.
    struct Memory(RefCell<[u8; 16384]>);

    impl DmaMemory for Memory {
        fn device_address(&self, offset: usize) -> u64 {
            offset as u64
        }
        fn write(&self, offset: usize, bytes: &[u8]) {
            self.0.borrow_mut()[offset..offset + bytes.len()].copy_from_slice(bytes);
        }
        fn read(&self, offset: usize, bytes: &mut [u8]) {
            bytes.copy_from_slice(&self.0.borrow()[offset..offset + bytes.len()]);
        }
    }

    /// Counts the completion head register's writes and keeps the last.
    #[derive(Default)]
    struct HeadRegister {
        writes: Cell<u32>,
        last: Cell<u32>,
    }

    impl Registers for HeadRegister {
        fn read32(&self, _offset: usize) -> u32 {
            0
        }
        fn write32(&self, offset: usize, value: u32) {
            if offset == regs::cq_head_doorbell(1, 4) {
                self.writes.set(self.writes.get() + 1);
                self.last.set(value);
            }
        }
    }

    const SQ: usize = 0;
    const CQ: usize = 0x1000;
    const DOORBELLS: usize = 0x2000;
    const EVENTS: usize = 0x3000;

    /// Posts the completion of command `cid` in slot `slot` with `phase`.
    fn post(memory: &Memory, slot: u16, phase: bool, cid: u16) {
        let dw3 = u32::from(cid) | (u32::from(phase) << 16);
        memory.write(CQ + usize::from(slot) * CQ_ENTRY + 12, &dw3.to_le_bytes());
    }

    fn shadow_head(memory: &Memory) -> u32 {
        let mut bytes = [0u8; 4];
        memory.read(DOORBELLS + regs::cq_head_doorbell(1, 4) - regs::DOORBELLS, &mut bytes);
        u32::from_le_bytes(bytes)
    }

    #[test]
    fn a_polling_driver_hands_completions_back_through_the_shadow_and_rings_the_head_once_per_batch() {
        let memory = Memory(RefCell::new([0; 16384]));
        let register = HeadRegister::default();
        let mut queue = QueuePair::new(1, 4, SQ, CQ, 4);
        queue.use_shadow(DOORBELLS, EVENTS);
        // Four commands, one at a time: the head comes round to 0, the
        // value the register holds.
        for n in 0..4u16 {
            assert!(queue.push(&memory, &Submission::new(0, n)));
            queue.ring(&register, &memory);
            post(&memory, n, true, n);
            assert_eq!(queue.pop(&memory).map(|c| c.cid), Some(n));
            queue.publish_head(&register, &memory);
            assert_eq!(register.writes.get(), 0, "a polling driver writes no head register");
            assert_eq!(shadow_head(&memory), u32::from((n + 1) % 4), "the shadow holds the head");
        }
        // Before a sleep: one write, though the value is the one last written.
        queue.release_taken(&register, &memory);
        assert_eq!((register.writes.get(), register.last.get()), (1, 0));
        // Nothing taken since: no second write (a controller may count each).
        queue.release_taken(&register, &memory);
        assert_eq!(register.writes.get(), 1);
        assert!(queue.push(&memory, &Submission::new(0, 9)));
        post(&memory, 0, false, 9);
        assert_eq!(queue.pop(&memory).map(|c| c.cid), Some(9));
        queue.release_taken(&register, &memory);
        assert_eq!((register.writes.get(), register.last.get()), (2, 1));
    }

    #[test]
    fn without_the_shadow_every_hand_back_writes_the_register() {
        let memory = Memory(RefCell::new([0; 16384]));
        let register = HeadRegister::default();
        let mut queue = QueuePair::new(1, 4, SQ, CQ, 4);
        queue.use_mirror(DOORBELLS);
        assert!(queue.push(&memory, &Submission::new(0, 1)));
        post(&memory, 0, true, 1);
        assert!(queue.pop(&memory).is_some());
        queue.publish_head(&register, &memory);
        assert_eq!((register.writes.get(), register.last.get()), (1, 1));
        assert_eq!(shadow_head(&memory), 1, "the mirror holds it too");
        queue.release_taken(&register, &memory);
        assert_eq!(register.writes.get(), 1, "already written");
    }

    #[test]
    fn the_event_index_asks_for_a_doorbell_only_when_passed() {
        // The controller wants to hear when index 5 is passed.
        assert!(need_event(5, 6, 5));
        assert!(need_event(5, 9, 3));
        assert!(!need_event(5, 5, 3), "5 not yet passed");
        assert!(!need_event(5, 9, 7), "passed before, already told");
        // 16-bit wrap.
        assert!(need_event(0xffff, 1, 0xfffe));
        assert!(!need_event(3, 2, 0xfffe));
    }
}
