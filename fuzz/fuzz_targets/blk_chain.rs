//! A client's virtio-blk queue: descriptor table, avail ring and buffers
//! all from the input, walked by virtio-queue and the reflector's chain
//! walker, parsed by `blk::marshal`, and every copy the device would make
//! done both ways. Nothing may panic; accepted requests obey the limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use reflector::blk::marshal::{self, Limits};
use virtio_queue::QueueT;
use vm_memory::VolatileSlice;

const SLOT: usize = 128 << 10;

fuzz_target!(|input: (u8, u8, bool, Vec<u8>)| {
    let (size_log2, segments_kept, read_only, bytes) = input;
    let Some((memory, mut queue, size)) = driver_vms_fuzz::client_queue(size_log2, &bytes) else { return };
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
