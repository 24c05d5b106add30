//! A client's virtio-net queues: chains from the input, walked by
//! virtio-queue and the reflector's walker, then judged and copied by
//! `net::marshal` as transmit chains and as receive buffers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use reflector::net::marshal;
use virtio_queue::QueueT;
use vm_memory::VolatileSlice;

fuzz_target!(|input: (u8, u16, Vec<u8>)| {
    let (size_log2, frame_len, bytes) = input;
    let Some((memory, mut queue, size)) = driver_vms_fuzz::client_queue(size_log2, &bytes) else { return };
    let mut slot = vec![0u8; 2048];
    let mut receive_chains = Vec::new();
    for _ in 0..size {
        let Some(chain) = queue.pop_descriptor_chain(&memory) else { break };
        let Ok(segments) = marshal::chain_segments(chain, 1536) else { continue };
        if let Ok(len) = marshal::tx_frame_len(&memory, &segments) {
            assert!(len as usize <= 1518);
            let bounce = VolatileSlice::from(&mut slot[..]);
            let _ = marshal::copy_tx_frame(&memory, &segments, &bounce);
        }
        if marshal::rx_capacity(&memory, &segments).is_ok() {
            receive_chains.push(segments);
        }
    }
    let frame_len = usize::from(frame_len) % slot.len();
    let frame = VolatileSlice::from(&mut slot[..frame_len]);
    let _ = marshal::write_rx_frame(&memory, &receive_chains, &frame);
});
