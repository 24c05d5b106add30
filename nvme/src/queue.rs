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
    /// The head the controller was last told.
    released: u16,
    /// The shadow doorbell buffer, if the controller offered one.
    shadow: Option<Shadow>,
}

/// Where a queue pair's shadow doorbells and EventIdx entries are (DMA
/// offsets, NVMe 1.4 section 5.8: Doorbell Buffer Config). The driver
/// writes each new index into its shadow doorbell and writes the register
/// only when the controller's EventIdx asks for it (it then reads the
/// shadow itself), as virtio's event index works.
#[derive(Clone, Copy, Debug)]
pub struct Shadow {
    sq_tail: usize,
    cq_head: usize,
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
            shadow: None,
        }
    }

    /// Uses the shadow doorbell buffer at DMA offset `doorbells` and the
    /// EventIdx buffer at `events` (zeroed pages the controller was told).
    pub fn use_shadow(&mut self, doorbells: usize, events: usize) {
        let sq = regs::sq_tail_doorbell(self.id, self.stride) - regs::DOORBELLS;
        let cq = regs::cq_head_doorbell(self.id, self.stride) - regs::DOORBELLS;
        self.shadow = Some(Shadow {
            sq_tail: doorbells + sq,
            cq_head: doorbells + cq,
            sq_event: events + sq,
            cq_event: events + cq,
        });
    }

    /// Writes the current indices into the shadow doorbells (when they
    /// are first used, the controller reads them from there).
    pub fn sync_shadow(&self, memory: &impl DmaMemory) {
        if let Some(shadow) = self.shadow {
            memory.write(shadow.sq_tail, &u32::from(self.tail).to_le_bytes());
            memory.write(shadow.cq_head, &u32::from(self.head).to_le_bytes());
            fence(Ordering::SeqCst);
        }
    }

    /// Publishes `value` (moved from `old`) in the shadow doorbell at
    /// `shadow`; whether the register must be written too.
    fn publish(memory: &impl DmaMemory, shadow: usize, event: usize, value: u16, old: u16) -> bool {
        memory.write(shadow, &u32::from(value).to_le_bytes());
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
            let needed = match self.shadow {
                Some(shadow) => Self::publish(memory, shadow.sq_tail, shadow.sq_event, self.tail, self.rung),
                None => true,
            };
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
        if let Some(shadow) = self.shadow {
            Self::publish(memory, shadow.cq_head, shadow.cq_event, self.head, self.released);
        }
        registers.write32(regs::cq_head_doorbell(self.id, self.stride), u32::from(self.head));
        self.released = self.head;
    }
}

#[cfg(test)]
mod tests {
    use super::need_event;

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
