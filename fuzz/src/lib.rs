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
