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
}

impl QueuePair {
    /// Queue `id` of `depth` entries, its rings at `sq` and `cq` (offsets
    /// in DMA memory, zeroed by the caller), doorbells `stride` apart.
    pub fn new(id: u16, depth: u16, sq: usize, cq: usize, stride: usize) -> Self {
        QueuePair { id, depth, sq, cq, stride, tail: 0, rung: 0, head: 0, phase: true, outstanding: 0 }
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
    pub fn ring(&mut self, registers: &impl Registers) {
        if self.tail != self.rung {
            // The entries must be in memory before the controller looks.
            fence(Ordering::SeqCst);
            registers.write32(regs::sq_tail_doorbell(self.id, self.stride), u32::from(self.tail));
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
    pub fn release(&self, registers: &impl Registers) {
        registers.write32(regs::cq_head_doorbell(self.id, self.stride), u32::from(self.head));
    }
}
