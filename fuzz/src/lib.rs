//! Helpers shared by the fuzz targets.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest memory a client queue lives in: the input at 0.
pub const MEMORY: usize = 64 << 10;

/// A client's split virtqueue of `1 << (size_log2 % 5)` entries (up to 16)
/// over memory holding `bytes` at 0: descriptor table at 0, avail ring at
/// 0x100, used ring at 0x200, so that inputs of a few hundred bytes already
/// publish chains. None if that is not a valid queue.
pub fn client_queue(size_log2: u8, bytes: &[u8]) -> Option<(GuestMemoryMmap, Queue, u16)> {
    let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEMORY)]).ok()?;
    memory.write_slice(&bytes[..bytes.len().min(MEMORY)], GuestAddress(0)).ok()?;
    let size = 1u16 << (size_log2 % 5);
    let mut queue = Queue::new(256).ok()?;
    queue.set_size(size);
    queue.set_desc_table_address(Some(0), Some(0));
    queue.set_avail_ring_address(Some(0x100), Some(0));
    queue.set_used_ring_address(Some(0x200), Some(0));
    queue.set_ready(true);
    queue.is_valid(&memory).then_some((memory, queue, size))
}

/// A memfd of `len` bytes: a storage medium whose flushes cost nothing, so
/// the fuzzer runs fast.
pub fn memfd_medium(len: u64) -> std::fs::File {
    // SAFETY: memfd_create with a static name; checked below.
    let fd = unsafe { libc::memfd_create(c"fuzz-medium".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: a fresh descriptor we own.
    let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.set_len(len).expect("sizing the medium");
    file
}

/// What a hostile driver of the simulated storage controller does: write
/// registers, queue commands, and (the reflector) step and quiesce it.
#[derive(arbitrary::Arbitrary, Debug)]
pub enum StorageStep {
    /// A register word below the queues.
    Register {
        /// Word index.
        offset: u8,
        /// Value.
        value: u32,
    },
    /// A command in the submission queue; an even `dma` is aimed inside
    /// `[dma_base, dma_base + dma_span)`, an odd one anywhere.
    Submit {
        /// Queue entry.
        at: u8,
        /// Opcode (mod 4).
        opcode: u16,
        /// Command id.
        cid: u16,
        /// Length (mod 256 KiB).
        len: u32,
        /// Sector (mod 4096).
        lba: u64,
        /// DMA address.
        dma: u64,
    },
    /// One round of the engine.
    Step,
    /// Quiesce or resume it.
    Quiesce(bool),
}

/// Zeroes the controller's window `regs`: each input starts from a
/// controller fresh out of power-on.
pub fn clear_storage_window(regs: &reflector::shm::SharedMemory) {
    for offset in (0..guest_abi::storage::WINDOW_SIZE).step_by(4) {
        regs.atomic_u32(offset).store(0, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Performs `step` on `engine` over its window `regs`.
pub fn storage_step(
    engine: &mut reflector::hw::sim_storage::EngineHarness,
    regs: &reflector::shm::SharedMemory,
    step: StorageStep,
    dma_base: u64,
    dma_span: u64,
) {
    use guest_abi::storage::{self, reg, Command};
    use std::sync::atomic::Ordering;
    match step {
        StorageStep::Register { offset, value } => {
            let offset = usize::from(offset) * 4;
            if offset + 4 <= storage::SQ_OFFSET {
                regs.atomic_u32(offset).store(value, Ordering::SeqCst);
            }
        }
        StorageStep::Submit { at, opcode, cid, len, lba, dma } => {
            let depth = regs.atomic_u32(reg::QUEUE_DEPTH).load(Ordering::SeqCst).max(1);
            let offset = storage::SQ_OFFSET + (u32::from(at) % depth.min(storage::MAX_QUEUE_DEPTH)) as usize * 32;
            let dma = if dma & 1 == 0 { dma_base + (dma >> 1) % dma_span } else { dma };
            regs.write(
                offset,
                Command { opcode: opcode % 4, cid, len: len % (256 << 10), lba: lba % 4096, dma, reserved: 0 },
            );
        }
        StorageStep::Step => {
            let worked = engine.step();
            // Work it says it has is work a step does: else its thread
            // would poll for ever instead of sleeping.
            assert!(worked || !engine.has_pending_work() || engine.step(), "pending work no step does");
        }
        StorageStep::Quiesce(on) => engine.set_quiesced(on),
    }
}
