//! The one place that reads and writes a client's memory (the QEMU guest's
//! RAM, shared over vhost-user): parsing virtio-blk descriptor chains,
//! copying payloads between client memory and bounce slots, and (with
//! `dma=direct`) choosing the client buffers a request's DMA window covers.
//!
//! A client is untrusted: every descriptor is checked against the client's
//! memory table and the virtio-blk rules (direction, lengths, alignment,
//! capacity) before anything is copied, and a malformed request completes
//! with the virtio-blk status the spec asks for instead of reaching a driver.

use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

use crate::client_memory::ClientMemory;
use crate::hw::dma_windows::{DeviceAccess, Window};

use virtio::blk::HEADER_LEN;
pub use virtio::blk::{
    ID_BYTES as VIRTIO_BLK_ID_BYTES, S_IOERR as VIRTIO_BLK_S_IOERR, S_OK as VIRTIO_BLK_S_OK,
    S_UNSUPP as VIRTIO_BLK_S_UNSUPP, T_FLUSH as VIRTIO_BLK_T_FLUSH, T_GET_ID as VIRTIO_BLK_T_GET_ID,
    T_IN as VIRTIO_BLK_T_IN, T_OUT as VIRTIO_BLK_T_OUT,
};
const SECTOR: u32 = virtio::blk::SECTOR_SIZE as u32;

/// One descriptor as the client wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Client guest-physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub writable: bool,
}

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// Read sectors into the data segments.
    Read,
    /// Write the data segments to sectors.
    Write,
    /// Make writes durable.
    Flush,
    /// Return the device id.
    GetId,
}

/// A well-formed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkRequest {
    /// Kind.
    pub kind: RequestKind,
    /// First sector.
    pub sector: u64,
    /// Data segments (client address, length), in order.
    pub data: Vec<(GuestAddress, u32)>,
}

impl BlkRequest {
    /// Payload length.
    pub fn data_len(&self) -> u32 {
        self.data.iter().map(|(_, len)| len).sum()
    }
}

/// Why a request was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// Fewer than two descriptors (header and status).
    #[error("chain of {0} descriptors is too short")]
    TooShort(usize),
    /// More descriptors than advertised with seg_max.
    #[error("chain has more than {0} descriptors")]
    TooLong(usize),
    /// The header descriptor is not 16 device-readable bytes.
    #[error("bad header descriptor")]
    BadHeader,
    /// The status descriptor is not device-writable.
    #[error("bad status descriptor")]
    BadStatus,
    /// A descriptor lies outside client memory.
    #[error("descriptor [{addr:#x}, +{len}) is outside client memory")]
    OutsideMemory {
        /// Its address.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// A data descriptor goes the wrong way for the request type.
    #[error("data descriptor has the wrong direction for the request")]
    WrongDirection,
    /// A zero-length data descriptor, or a read/write with no data.
    #[error("zero-length data")]
    ZeroLength,
    /// Data not a multiple of the sector size.
    #[error("data length {0} is not a multiple of 512")]
    Unaligned(u32),
    /// More data than the device accepts in one request.
    #[error("data length {0} exceeds the limit")]
    TooLarge(u64),
    /// The sector range is beyond the end of the device.
    #[error("sectors {sector}+{sectors} are beyond the capacity")]
    BeyondCapacity {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        sectors: u64,
    },
    /// A write to a read-only device.
    #[error("write to a read-only device")]
    ReadOnly,
    /// A request type this device does not implement.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
}

impl Malformed {
    /// The virtio-blk status to complete the request with.
    pub fn status(&self) -> u8 {
        match self {
            Malformed::Unsupported(_) => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        }
    }
}

/// What the device accepts.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Device size in sectors.
    pub capacity_sectors: u64,
    /// Largest payload of one request.
    pub max_data: u32,
    /// Most data descriptors in one request (seg_max).
    pub max_segments: usize,
    /// Writes are refused.
    pub read_only: bool,
}

/// A parse result: the request, or why not; and where the status byte goes
/// if the status descriptor itself is usable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    /// The request or the reason it is malformed.
    pub request: Result<BlkRequest, Malformed>,
    /// Address of the status byte.
    pub status: Option<GuestAddress>,
}

fn in_memory(memory: &GuestMemoryMmap, segment: &Segment) -> Result<(), Malformed> {
    match memory.get_slice(segment.addr, segment.len as usize) {
        Ok(_) => Ok(()),
        Err(_) => Err(Malformed::OutsideMemory { addr: segment.addr.0, len: segment.len }),
    }
}

/// Parses a descriptor chain (`segments`, in chain order).
pub fn parse(memory: &GuestMemoryMmap, segments: &[Segment], limits: &Limits) -> Parsed {
    let status = segments
        .last()
        .filter(|s| s.writable && s.len >= 1 && segments.len() >= 2 && in_memory(memory, s).is_ok())
        .map(|s| GuestAddress(s.addr.0 + u64::from(s.len) - 1));
    Parsed { request: parse_request(memory, segments, limits, status.is_some()), status }
}

fn parse_request(
    memory: &GuestMemoryMmap,
    segments: &[Segment],
    limits: &Limits,
    status_ok: bool,
) -> Result<BlkRequest, Malformed> {
    if segments.len() < 2 {
        return Err(Malformed::TooShort(segments.len()));
    }
    if segments.len() > limits.max_segments + 2 {
        return Err(Malformed::TooLong(limits.max_segments + 2));
    }
    if !status_ok {
        return Err(Malformed::BadStatus);
    }
    let header = segments[0];
    if header.writable || header.len as usize != HEADER_LEN {
        return Err(Malformed::BadHeader);
    }
    in_memory(memory, &header)?;
    let mut raw = [0u8; HEADER_LEN];
    memory.read_slice(&mut raw, header.addr).map_err(|_| Malformed::BadHeader)?;
    let (request_type, sector) = virtio::blk::parse_header(&raw);
    let kind = match request_type {
        VIRTIO_BLK_T_IN => RequestKind::Read,
        VIRTIO_BLK_T_OUT => RequestKind::Write,
        VIRTIO_BLK_T_FLUSH => RequestKind::Flush,
        VIRTIO_BLK_T_GET_ID => RequestKind::GetId,
        other => return Err(Malformed::Unsupported(other)),
    };
    let data_segments = &segments[1..segments.len() - 1];
    let device_writes = matches!(kind, RequestKind::Read | RequestKind::GetId);
    let mut data = Vec::with_capacity(data_segments.len());
    let mut total = 0u64;
    for segment in data_segments {
        if segment.len == 0 {
            return Err(Malformed::ZeroLength);
        }
        if segment.writable != device_writes {
            return Err(Malformed::WrongDirection);
        }
        in_memory(memory, segment)?;
        total += u64::from(segment.len);
        data.push((segment.addr, segment.len));
    }
    // Every kind is bounded, so that `data_len` (a u32) cannot overflow.
    if total > u64::from(limits.max_data) {
        return Err(Malformed::TooLarge(total));
    }
    match kind {
        RequestKind::Read | RequestKind::Write => {
            if kind == RequestKind::Write && limits.read_only {
                return Err(Malformed::ReadOnly);
            }
            if total == 0 {
                return Err(Malformed::ZeroLength);
            }
            if !total.is_multiple_of(u64::from(SECTOR)) {
                return Err(Malformed::Unaligned(total as u32));
            }
            let sectors = total / u64::from(SECTOR);
            if sector.checked_add(sectors).is_none_or(|end| end > limits.capacity_sectors) {
                return Err(Malformed::BeyondCapacity { sector, sectors });
            }
        }
        RequestKind::Flush => data.clear(),
        RequestKind::GetId => {}
    }
    Ok(BlkRequest { kind, sector, data })
}

/// Pairs each data segment's client memory with its part of the bounce
/// slot (segments are laid out back to back in the slot).
fn for_each_segment<'a>(
    memory: &'a GuestMemoryMmap,
    request: &BlkRequest,
    slot: &VolatileSlice<'a>,
    mut copy: impl FnMut(VolatileSlice<'a>, VolatileSlice<'a>),
) -> Result<(), Malformed> {
    let mut offset = 0usize;
    for &(addr, len) in &request.data {
        let client =
            memory.get_slice(addr, len as usize).map_err(|_| Malformed::OutsideMemory { addr: addr.0, len })?;
        let bounce =
            slot.subslice(offset, len as usize).map_err(|_| Malformed::TooLarge(offset as u64 + u64::from(len)))?;
        copy(client, bounce);
        offset += len as usize;
    }
    Ok(())
}

/// The descriptors of a chain for [`parse`]: the first `keep` (a device
/// keeps SEG_MAX + 2) and, if the chain is longer, its true last one (the status descriptor),
/// so that an over-long chain is refused with its status written where the
/// client expects it, never into a data buffer. virtio-queue bounds the walk
/// (by the queue size, or the indirect table's length) and ends it without a
/// word at a loop, a `next` outside the table or a bad indirect table: the
/// last descriptor then still has NEXT, and the chain is refused (`None`).
pub fn chain_segments(
    chain: impl Iterator<Item = virtio_queue::desc::split::Descriptor>,
    keep: usize,
) -> Option<Vec<Segment>> {
    let mut segments = Vec::with_capacity(keep + 1);
    let mut last = None;
    let mut cut_short = false;
    for (index, descriptor) in chain.enumerate() {
        cut_short = descriptor.has_next();
        let segment = Segment { addr: descriptor.addr(), len: descriptor.len(), writable: descriptor.is_write_only() };
        if index < keep {
            segments.push(segment);
        } else {
            last = Some(segment);
        }
    }
    segments.extend(last);
    (!cut_short).then_some(segments)
}

/// Copies a write's payload from client memory into its bounce slot.
pub fn copy_to_slot(memory: &GuestMemoryMmap, request: &BlkRequest, slot: &VolatileSlice) -> Result<(), Malformed> {
    for_each_segment(memory, request, slot, |client, bounce| client.copy_to_volatile_slice(bounce))
}

/// Copies a read's payload from its bounce slot into client memory.
pub fn copy_from_slot(memory: &GuestMemoryMmap, request: &BlkRequest, slot: &VolatileSlice) -> Result<(), Malformed> {
    for_each_segment(memory, request, slot, |client, bounce| bounce.copy_to_volatile_slice(client))
}

/// The DMA window onto a read's or write's data buffers (`dma=direct`):
/// exactly the buffers the client gave, in order, writable by the device for
/// a read and readable for a write; none for other kinds.
pub fn dma_window(memory: &ClientMemory, request: &BlkRequest, limit: u32) -> Option<Window> {
    let access = match request.kind {
        RequestKind::Read => DeviceAccess::Write,
        RequestKind::Write => DeviceAccess::Read,
        RequestKind::Flush | RequestKind::GetId => return None,
    };
    // The window keeps the table's SIGBUS registration as long as its
    // mapping (a client may replace the table and shrink the old one).
    let guard: Arc<dyn std::any::Any + Send + Sync> = Arc::new(memory.clone());
    Window::new(memory.mapping(), Some(guard), request.data.clone(), access, limit).ok()
}

/// Writes the device id (NUL padded to 20 bytes, truncated to the buffer)
/// into a GET_ID request's data; returns the bytes written.
pub fn write_id(memory: &GuestMemoryMmap, request: &BlkRequest, id: &str) -> Result<u32, Malformed> {
    let mut bytes = [0u8; VIRTIO_BLK_ID_BYTES];
    let take = id.len().min(VIRTIO_BLK_ID_BYTES);
    bytes[..take].copy_from_slice(&id.as_bytes()[..take]);
    let mut written = 0usize;
    for &(addr, len) in &request.data {
        let n = (len as usize).min(VIRTIO_BLK_ID_BYTES - written);
        memory
            .write_slice(&bytes[written..written + n], addr)
            .map_err(|_| Malformed::OutsideMemory { addr: addr.0, len })?;
        written += n;
        if written == VIRTIO_BLK_ID_BYTES {
            break;
        }
    }
    Ok(written as u32)
}

/// Writes the status byte; false if the address is no longer valid.
pub fn write_status(memory: &GuestMemoryMmap, status: GuestAddress, value: u8) -> bool {
    memory.write_slice(&[value], status).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMORY_SIZE: u64 = 1 << 20;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY_SIZE as usize)]).unwrap()
    }

    fn limits() -> Limits {
        Limits { capacity_sectors: 2048, max_data: 128 * 1024, max_segments: 32, read_only: false }
    }

    fn header(memory: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) -> Segment {
        memory.write_slice(&virtio::blk::header(kind, sector), GuestAddress(at)).unwrap();
        Segment { addr: GuestAddress(at), len: 16, writable: false }
    }

    fn data(at: u64, len: u32, writable: bool) -> Segment {
        Segment { addr: GuestAddress(at), len, writable }
    }

    fn status() -> Segment {
        data(0x100, 1, true)
    }

    #[test]
    fn well_formed_read_write_flush_get_id() {
        let m = memory();
        let read = parse(&m, &[header(&m, 0, VIRTIO_BLK_T_IN, 8), data(0x1000, 4096, true), status()], &limits());
        assert_eq!(read.status, Some(GuestAddress(0x100)));
        let read = read.request.unwrap();
        assert_eq!((read.kind, read.sector, read.data_len()), (RequestKind::Read, 8, 4096));
        let write = parse(
            &m,
            &[header(&m, 0, VIRTIO_BLK_T_OUT, 0), data(0x1000, 512, false), data(0x3000, 1024, false), status()],
            &limits(),
        );
        assert_eq!(write.request.unwrap().data, vec![(GuestAddress(0x1000), 512), (GuestAddress(0x3000), 1024)]);
        let flush = parse(&m, &[header(&m, 0, VIRTIO_BLK_T_FLUSH, 0), status()], &limits());
        assert_eq!(flush.request.unwrap().kind, RequestKind::Flush);
        let id = parse(&m, &[header(&m, 0, VIRTIO_BLK_T_GET_ID, 0), data(0x1000, 20, true), status()], &limits());
        let id = id.request.unwrap();
        assert_eq!(write_id(&m, &id, "drvm-disk0").unwrap(), 20);
        let mut raw = [0u8; 20];
        m.read_slice(&mut raw, GuestAddress(0x1000)).unwrap();
        assert_eq!(&raw[..10], b"drvm-disk0");
        assert_eq!(raw[10..], [0u8; 10]);
    }

    #[test]
    fn malformed_requests_get_the_right_status() {
        let m = memory();
        let next_header = std::cell::Cell::new(0x40000u64);
        let h = |kind, sector| {
            let at = next_header.replace(next_header.get() + 16);
            header(&m, at, kind, sector)
        };
        let cases: Vec<(Vec<Segment>, Malformed)> = vec![
            (vec![h(VIRTIO_BLK_T_IN, 0)], Malformed::TooShort(1)),
            (vec![h(VIRTIO_BLK_T_IN, 0), data(0x1000, 512, true), data(0x100, 1, false)], Malformed::BadStatus),
            (vec![data(0, 8, false), data(0x1000, 512, true), status()], Malformed::BadHeader),
            (vec![data(0, 16, true), data(0x1000, 512, true), status()], Malformed::BadHeader),
            (vec![h(VIRTIO_BLK_T_IN, 0), data(0x1000, 512, false), status()], Malformed::WrongDirection),
            (vec![h(VIRTIO_BLK_T_OUT, 0), data(0x1000, 512, true), status()], Malformed::WrongDirection),
            (vec![h(VIRTIO_BLK_T_IN, 0), data(0x1000, 0, true), status()], Malformed::ZeroLength),
            (vec![h(VIRTIO_BLK_T_IN, 0), status()], Malformed::ZeroLength),
            (vec![h(VIRTIO_BLK_T_IN, 0), data(0x1000, 100, true), status()], Malformed::Unaligned(100)),
            (
                vec![h(VIRTIO_BLK_T_IN, 2047), data(0x1000, 1024, true), status()],
                Malformed::BeyondCapacity { sector: 2047, sectors: 2 },
            ),
            (
                vec![h(VIRTIO_BLK_T_IN, u64::MAX), data(0x1000, 512, true), status()],
                Malformed::BeyondCapacity { sector: u64::MAX, sectors: 1 },
            ),
            (
                vec![h(VIRTIO_BLK_T_IN, 0), data(MEMORY_SIZE - 256, 512, true), status()],
                Malformed::OutsideMemory { addr: MEMORY_SIZE - 256, len: 512 },
            ),
            (
                vec![h(VIRTIO_BLK_T_IN, 0), data(u64::MAX - 10, 512, true), status()],
                Malformed::OutsideMemory { addr: u64::MAX - 10, len: 512 },
            ),
            (vec![h(VIRTIO_BLK_T_IN, 0), data(0x1000, 256 * 1024, true), status()], Malformed::TooLarge(256 * 1024)),
            (
                vec![h(VIRTIO_BLK_T_GET_ID, 0), data(0x1000, 256 * 1024, true), status()],
                Malformed::TooLarge(256 * 1024),
            ),
            (vec![h(99, 0), status()], Malformed::Unsupported(99)),
        ];
        for (segments, expected) in cases {
            let parsed = parse(&m, &segments, &limits());
            assert_eq!(parsed.request.as_ref().unwrap_err(), &expected, "{segments:?}");
        }
        assert_eq!(Malformed::Unsupported(99).status(), VIRTIO_BLK_S_UNSUPP);
        assert_eq!(Malformed::ZeroLength.status(), VIRTIO_BLK_S_IOERR);
        let many: Vec<Segment> = std::iter::once(h(VIRTIO_BLK_T_IN, 0))
            .chain((0..40).map(|i| data(0x1000 + i * 512, 512, true)))
            .chain([status()])
            .collect();
        assert_eq!(parse(&m, &many, &limits()).request, Err(Malformed::TooLong(34)));
        let read_only = Limits { read_only: true, ..limits() };
        let write = [h(VIRTIO_BLK_T_OUT, 0), data(0x1000, 512, false), status()];
        assert_eq!(parse(&m, &write, &read_only).request, Err(Malformed::ReadOnly));
        let outside_status = [h(VIRTIO_BLK_T_IN, 0), data(0x1000, 512, true), data(MEMORY_SIZE, 1, true)];
        assert_eq!(parse(&m, &outside_status, &limits()).status, None);
    }

    /// Fuzz-style: random chains (directions, lengths, addresses, header
    /// bytes) never panic the parser, and whatever it accepts obeys the rules.
    #[test]
    fn random_chains_never_panic_and_accepted_ones_obey_the_rules() {
        let m = memory();
        let mut state = 0x2545_f491_4f6c_dd1du64; // fixed seed: reproducible
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let mut raw = [0u8; 16];
            raw[0] = [0u8, 1, 4, 8, 3][(next() % 5) as usize];
            raw[8..16].copy_from_slice(&(next() % 4096).to_le_bytes());
            m.write_slice(&raw, GuestAddress(0)).unwrap();
            let count = (next() % 40) as usize;
            let segments: Vec<Segment> = (0..count)
                .map(|i| Segment {
                    addr: GuestAddress(if i == 0 { 0 } else { next() % (MEMORY_SIZE + 8192) }),
                    len: [0u32, 1, 16, 100, 512, 4096, 65536, u32::MAX][(next() % 8) as usize],
                    writable: next() % 2 == 0,
                })
                .collect();
            let parsed = parse(&m, &segments, &limits());
            if let Ok(request) = parsed.request {
                assert!(parsed.status.is_some());
                assert!(request.data_len() <= limits().max_data);
                if matches!(request.kind, RequestKind::Read | RequestKind::Write) {
                    assert!(request.data_len() > 0 && request.data_len() % 512 == 0);
                    assert!(request.sector + u64::from(request.data_len() / 512) <= limits().capacity_sectors);
                }
                for (addr, len) in &request.data {
                    assert!(m.get_slice(*addr, *len as usize).is_ok());
                }
            }
        }
    }

    #[test]
    fn payloads_copy_both_ways_across_segments() {
        let m = memory();
        m.write_slice(&[1u8; 512], GuestAddress(0x1000)).unwrap();
        m.write_slice(&[2u8; 1024], GuestAddress(0x8000)).unwrap();
        let request = BlkRequest {
            kind: RequestKind::Write,
            sector: 0,
            data: vec![(GuestAddress(0x1000), 512), (GuestAddress(0x8000), 1024)],
        };
        let mut bounce = vec![0u8; 4096];
        // SAFETY: the slice covers `bounce`, which outlives it.
        let slot = unsafe { VolatileSlice::new(bounce.as_mut_ptr(), bounce.len()) };
        copy_to_slot(&m, &request, &slot).unwrap();
        let back = BlkRequest { kind: RequestKind::Read, sector: 0, data: vec![(GuestAddress(0x20000), 1536)] };
        copy_from_slot(&m, &back, &slot).unwrap();
        let mut raw = vec![0u8; 1536];
        m.read_slice(&mut raw, GuestAddress(0x20000)).unwrap();
        assert!(raw[..512].iter().all(|b| *b == 1) && raw[512..].iter().all(|b| *b == 2));
        let gone = BlkRequest { data: vec![(GuestAddress(MEMORY_SIZE), 512)], ..back };
        assert!(copy_from_slot(&m, &gone, &slot).is_err());
        assert!(write_status(&m, GuestAddress(0x100), VIRTIO_BLK_S_OK));
        assert!(!write_status(&m, GuestAddress(MEMORY_SIZE), VIRTIO_BLK_S_OK));
    }
}
