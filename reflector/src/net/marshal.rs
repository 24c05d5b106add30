//! The one place the net path reads and writes a client's memory: taking a
//! frame out of a transmit chain, and writing a received frame (with its
//! virtio-net header) into one or more receive chains.
//!
//! A client is untrusted: every descriptor is checked for direction and
//! against the client's memory table, and lengths against the frame limits,
//! before anything is copied. A malformed chain is dropped (returned unused)
//! and counted by the caller; it never reaches a driver.

use guest_abi::nic::{MAX_FRAME, MIN_FRAME};
use vm_memory::{Address, Bytes, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

pub use crate::blk::marshal::Segment;
use virtio::net::{HEADER_LEN, HEADER_NUM_BUFFERS};

/// Why a chain was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// A descriptor points outside the client's memory.
    #[error("descriptor {addr:#x}+{len} is outside the client's memory")]
    OutsideMemory {
        /// Client address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// A transmit chain has a device-writable descriptor.
    #[error("a transmit chain has a device-writable descriptor")]
    WritableInTx,
    /// A receive chain has a device-readable descriptor.
    #[error("a receive chain has a device-readable descriptor")]
    ReadableInRx,
    /// A transmit chain too short for the header and an Ethernet header.
    #[error("transmit chain of {0} bytes is shorter than the 12-byte virtio-net header and a 14-byte Ethernet header")]
    TooShort(u64),
    /// A transmit chain whose frame is larger than the device's limit.
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit (no segmentation offload is offered)")]
    TooLong(u64),
    /// A receive chain too small for the header.
    #[error("receive chain of {0} bytes cannot hold the 12-byte virtio-net header")]
    TinyRxBuffer(u64),
    /// A chain of more descriptors than any client's frame needs
    /// ([`MAX_DESCRIPTORS`]).
    #[error("the chain has more than {MAX_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    /// The chain does not end: a `next` loop, a `next` outside the table, or an invalid
    /// indirect table.
    #[error("the chain does not end (a next loop, a next outside the table, or an invalid indirect table)")]
    BrokenChain,
}

fn in_memory(memory: &GuestMemoryMmap, segment: &Segment) -> Result<(), Malformed> {
    memory
        .get_slice(segment.addr, segment.len as usize)
        .map(|_| ())
        .map_err(|_| Malformed::OutsideMemory { addr: segment.addr.0, len: segment.len })
}

/// The most descriptors a chain may have. Linux's virtio-net driver puts a
/// frame in at most `MAX_SKB_FRAGS` + 2 descriptors (19 by default, 47 at
/// the kernel's largest setting), DPDK's fewer. Without a bound, a client
/// offering receive chains of zero-length descriptors (an indirect table
/// may hold 65,535) kept about 1 MiB of segments per chain held, 1 GiB per
/// device at its queue's size, however few bytes they described.
pub const MAX_DESCRIPTORS: usize = 64;

/// The descriptors of a chain, read until they hold more than `max_bytes`
/// (then the chain is too long anyway, and the rest is not read); more
/// than [`MAX_DESCRIPTORS`] of them is malformed.
/// virtio-queue ends a walk without a word at a loop (after queue-size
/// descriptors), at a `next` outside the table, or at an unreadable or
/// invalid indirect table: the last descriptor it yields then still has
/// NEXT. Such a chain is malformed, not a shorter one.
pub fn chain_segments(
    chain: impl Iterator<Item = virtio_queue::desc::split::Descriptor>,
    max_bytes: usize,
) -> Result<Vec<Segment>, Malformed> {
    let mut segments = Vec::new();
    let mut bytes = 0usize;
    let mut cut_short = false;
    for descriptor in chain {
        if segments.len() == MAX_DESCRIPTORS {
            return Err(Malformed::TooManyDescriptors);
        }
        segments.push(Segment { addr: descriptor.addr(), len: descriptor.len(), writable: descriptor.is_write_only() });
        bytes = bytes.saturating_add(descriptor.len() as usize);
        cut_short = descriptor.has_next();
        if bytes > max_bytes {
            cut_short = false;
            break;
        }
    }
    if cut_short {
        Err(Malformed::BrokenChain)
    } else {
        Ok(segments)
    }
}

/// The frame length of a transmit chain (header excluded), once every
/// descriptor is checked.
pub fn tx_frame_len(memory: &GuestMemoryMmap, segments: &[Segment]) -> Result<u32, Malformed> {
    let mut total = 0u64;
    for segment in segments {
        if segment.writable {
            return Err(Malformed::WritableInTx);
        }
        in_memory(memory, segment)?;
        total += u64::from(segment.len);
    }
    let frame = total.checked_sub(HEADER_LEN as u64).filter(|&f| f >= u64::from(MIN_FRAME));
    match frame {
        None => Err(Malformed::TooShort(total)),
        Some(frame) if frame > u64::from(MAX_FRAME) => Err(Malformed::TooLong(frame)),
        Some(frame) => Ok(frame as u32),
    }
}

/// Copies a transmit chain's frame (the bytes after the virtio-net header)
/// into `slot`; returns its length.
pub fn copy_tx_frame(memory: &GuestMemoryMmap, segments: &[Segment], slot: &VolatileSlice) -> Result<u32, Malformed> {
    let frame_len = tx_frame_len(memory, segments)?;
    let mut skip = HEADER_LEN as u64;
    let mut written = 0usize;
    for segment in segments {
        let len = u64::from(segment.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let take = (len - skip) as usize;
        let client = memory
            .get_slice(segment.addr.unchecked_add(skip), take)
            .map_err(|_| Malformed::OutsideMemory { addr: segment.addr.0, len: segment.len })?;
        let bounce = slot.subslice(written, take).map_err(|_| Malformed::TooLong(frame_len.into()))?;
        client.copy_to_volatile_slice(bounce);
        written += take;
        skip = 0;
    }
    Ok(frame_len)
}

/// The bytes a receive chain can take, once every descriptor is checked.
pub fn rx_capacity(memory: &GuestMemoryMmap, segments: &[Segment]) -> Result<u32, Malformed> {
    let mut total = 0u64;
    for segment in segments {
        if !segment.writable {
            return Err(Malformed::ReadableInRx);
        }
        in_memory(memory, segment)?;
        total += u64::from(segment.len);
    }
    if total < HEADER_LEN as u64 {
        return Err(Malformed::TinyRxBuffer(total));
    }
    // A chain larger than any frame is fine; only what a frame uses counts.
    Ok(total.min(u64::from(u32::MAX)) as u32)
}

/// Writes a virtio-net header (no offloads, `num_buffers` = chains used)
/// and `frame` across `chains` (checked with [`rx_capacity`], and together
/// large enough); returns the bytes written into each chain.
pub fn write_rx_frame(
    memory: &GuestMemoryMmap,
    chains: &[Vec<Segment>],
    frame: &VolatileSlice,
) -> Result<Vec<u32>, Malformed> {
    let mut header = [0u8; HEADER_LEN];
    header[HEADER_NUM_BUFFERS..HEADER_NUM_BUFFERS + 2].copy_from_slice(&(chains.len() as u16).to_le_bytes());
    let total = HEADER_LEN + frame.len();
    let mut at = 0usize;
    let mut used = Vec::with_capacity(chains.len());
    for chain in chains {
        let start = at;
        for segment in chain {
            if at == total {
                break;
            }
            let take = (segment.len as usize).min(total - at);
            write_part(memory, segment, &header, frame, at, take)?;
            at += take;
        }
        used.push((at - start) as u32);
    }
    Ok(used)
}

/// Writes bytes `[at, at + take)` of header-then-frame at the start of `segment`.
fn write_part(
    memory: &GuestMemoryMmap,
    segment: &Segment,
    header: &[u8; HEADER_LEN],
    frame: &VolatileSlice,
    at: usize,
    take: usize,
) -> Result<(), Malformed> {
    let outside = || Malformed::OutsideMemory { addr: segment.addr.0, len: segment.len };
    let mut done = 0usize;
    if at < HEADER_LEN {
        let n = (HEADER_LEN - at).min(take);
        memory.write_slice(&header[at..at + n], segment.addr).map_err(|_| outside())?;
        done = n;
    }
    if done < take {
        let from = at + done - HEADER_LEN;
        let n = take - done;
        let client = memory.get_slice(segment.addr.unchecked_add(done as u64), n).map_err(|_| outside())?;
        let source = frame.subslice(from, n).map_err(|_| outside())?;
        source.copy_to_volatile_slice(client);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    const MEMORY_SIZE: u64 = 1 << 20;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY_SIZE as usize)]).unwrap()
    }

    fn segment(addr: u64, len: u32, writable: bool) -> Segment {
        Segment { addr: GuestAddress(addr), len, writable }
    }

    #[test]
    fn transmit_chains_are_checked_and_the_frame_copied_without_its_header() {
        let memory = memory();
        let frame: Vec<u8> = (0..100u8).collect();
        // Header and the first 20 frame bytes in one descriptor, the rest in another.
        memory.write_slice(&[0xee; HEADER_LEN], GuestAddress(0x1000)).unwrap();
        memory.write_slice(&frame[..20], GuestAddress(0x1000 + HEADER_LEN as u64)).unwrap();
        memory.write_slice(&frame[20..], GuestAddress(0x3000)).unwrap();
        let chain = [segment(0x1000, HEADER_LEN as u32 + 20, false), segment(0x3000, 80, false)];
        let mut slot = vec![0u8; 2048];
        // SAFETY: `slot` outlives the slice and nothing else accesses it meanwhile.
        let bounce = unsafe { VolatileSlice::new(slot.as_mut_ptr(), slot.len()) };
        assert_eq!(copy_tx_frame(&memory, &chain, &bounce), Ok(100));
        assert_eq!(&slot[..100], &frame[..]);

        assert_eq!(tx_frame_len(&memory, &[segment(0x1000, 20, false)]), Err(Malformed::TooShort(20)));
        assert_eq!(tx_frame_len(&memory, &[segment(0x1000, 4000, false)]), Err(Malformed::TooLong(3988)));
        assert_eq!(tx_frame_len(&memory, &[segment(0x1000, 100, true)]), Err(Malformed::WritableInTx));
        assert!(matches!(
            tx_frame_len(&memory, &[segment(MEMORY_SIZE - 10, 100, false)]),
            Err(Malformed::OutsideMemory { .. })
        ));
        assert_eq!(tx_frame_len(&memory, &[]), Err(Malformed::TooShort(0)));
    }

    #[test]
    fn a_received_frame_spans_chains_with_num_buffers_in_the_first_header() {
        let memory = memory();
        let mut frame: Vec<u8> = (0..1500u32).map(|i| i as u8).collect();
        // SAFETY: `frame` outlives the slice and nothing else accesses it meanwhile.
        let source = unsafe { VolatileSlice::new(frame.as_mut_ptr(), frame.len()) };
        let chains =
            vec![vec![segment(0x1000, 1000, true)], vec![segment(0x8000, 100, true), segment(0x9000, 900, true)]];
        for chain in &chains {
            assert!(rx_capacity(&memory, chain).is_ok());
        }
        let used = write_rx_frame(&memory, &chains, &source).unwrap();
        assert_eq!(used, vec![1000, 512]);
        let mut header = [0u8; HEADER_LEN];
        memory.read_slice(&mut header, GuestAddress(0x1000)).unwrap();
        assert_eq!(u16::from_le_bytes([header[10], header[11]]), 2);
        assert_eq!(&header[..10], &[0; 10]);
        let mut back = vec![0u8; 1500];
        memory.read_slice(&mut back[..988], GuestAddress(0x1000 + HEADER_LEN as u64)).unwrap();
        memory.read_slice(&mut back[988..1088], GuestAddress(0x8000)).unwrap();
        memory.read_slice(&mut back[1088..], GuestAddress(0x9000)).unwrap();
        assert_eq!(back, frame);

        assert_eq!(rx_capacity(&memory, &[segment(0x1000, 100, false)]), Err(Malformed::ReadableInRx));
        assert_eq!(rx_capacity(&memory, &[segment(0x1000, 4, true)]), Err(Malformed::TinyRxBuffer(4)));
    }

    #[test]
    fn a_chain_of_more_descriptors_than_any_frame_needs_is_refused_however_few_bytes_it_holds() {
        use virtio_queue::desc::split::Descriptor;
        const NEXT: u16 = 1;
        const WRITE: u16 = 2;
        let chain = |zero_length: usize| {
            (0..zero_length)
                .map(|i| Descriptor::new(0x1000, 0, NEXT | WRITE, i as u16 + 1))
                .chain(std::iter::once(Descriptor::new(0x2000, HEADER_LEN as u32, WRITE, 0)))
                .collect::<Vec<_>>()
        };
        let most = chain_segments(chain(MAX_DESCRIPTORS - 1).into_iter(), 1536).unwrap();
        assert_eq!(most.len(), MAX_DESCRIPTORS);
        assert_eq!(
            chain_segments(chain(MAX_DESCRIPTORS).into_iter(), 1536),
            Err(Malformed::TooManyDescriptors),
            "one descriptor more than any frame needs"
        );
        // An indirect table's worth: refused without keeping it.
        assert_eq!(chain_segments(chain(65_534).into_iter(), 1536), Err(Malformed::TooManyDescriptors));
    }

    #[test]
    fn random_chains_never_panic() {
        let memory = memory();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut slot = vec![0u8; 4096];
        // SAFETY: `slot` outlives the slice and nothing else accesses it meanwhile.
        let bounce = unsafe { VolatileSlice::new(slot.as_mut_ptr(), slot.len()) };
        for _ in 0..20_000 {
            let chain: Vec<Segment> = (0..next() % 5)
                .map(|_| segment(next() % (MEMORY_SIZE + 4096), (next() % 3000) as u32, next() % 4 == 0))
                .collect();
            if let Ok(len) = copy_tx_frame(&memory, &chain, &bounce) {
                assert!((MIN_FRAME..=MAX_FRAME).contains(&len));
            }
            if rx_capacity(&memory, &chain).is_ok() {
                let frame = bounce.subslice(0, 60).unwrap();
                let _ = write_rx_frame(&memory, std::slice::from_ref(&chain), &frame);
            }
        }
    }
}
