//! A client's virtio-blk queue: descriptor table, avail ring and buffers
//! all from the input, walked by virtio-queue and the reflector's chain
//! walker, parsed by `blk::marshal`, and every copy the device would make
//! done both ways. Nothing may panic; accepted requests obey the limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use reflector::blk::marshal::{self, Limits};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, VolatileSlice};

/// Guest memory: the input at 0, rings at fixed places inside.
const MEMORY: usize = 64 << 10;
const SLOT: usize = 128 << 10;

fuzz_target!(|input: (u8, u8, bool, Vec<u8>)| {
    let (size_log2, segments_kept, read_only, bytes) = input;
    let Ok(memory) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEMORY)]) else { return };
    let _ = memory.write_slice(&bytes[..bytes.len().min(MEMORY)], GuestAddress(0));
    let size = 1u16 << (size_log2 % 9);
    let Ok(mut queue) = Queue::new(256) else { return };
    queue.set_size(size);
    queue.set_desc_table_address(Some(0), Some(0));
    queue.set_avail_ring_address(Some(0x4000), Some(0));
    queue.set_used_ring_address(Some(0x8000), Some(0));
    queue.set_ready(true);
    if !queue.is_valid(&memory) {
        return;
    }
    let limits = Limits { capacity_sectors: 2048, max_data: SLOT as u32, max_segments: 32, read_only };
    let mut slot = vec![0u8; SLOT];
    for _ in 0..size {
        let Some(chain) = queue.pop_descriptor_chain(&memory) else { break };
        let Some(segments) = marshal::chain_segments(chain, usize::from(segments_kept % 40) + 2) else { continue };
        let parsed = marshal::parse(&memory, &segments, &limits);
        if let Some(status) = parsed.status {
            marshal::write_status(&memory, status, 0);
        }
        let Ok(request) = parsed.request else { continue };
        assert!(request.data_len() as usize <= SLOT);
        assert!(request.data.len() <= limits.max_segments);
        let bounce = VolatileSlice::from(&mut slot[..request.data_len() as usize]);
        let _ = marshal::copy_to_slot(&memory, &request, &bounce);
        let _ = marshal::copy_from_slot(&memory, &request, &bounce);
        let _ = marshal::write_id(&memory, &request, "fuzz");
    }
});
