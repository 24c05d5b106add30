//! The driver side of one split virtqueue (virtio 1.x, section 2.7), over raw shared memory.
//!
//! Layout: descriptor table, then the available ring, then (on its own page, so the two sides
//! do not write the same cache lines) the used ring. All ring indexes are free-running `u16`
//! counters that wrap; only their difference matters.

use std::sync::atomic::{fence, AtomicU16, Ordering};

use crate::error::{Error, Result};

/// Descriptor flag: the chain continues in `next`.
pub const VRING_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer (otherwise it reads it).
pub const VRING_DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is a table of descriptors (VIRTIO_RING_F_INDIRECT_DESC).
pub const VRING_DESC_F_INDIRECT: u16 = 4;
/// Used-ring flag: the device does not need kicks (without EVENT_IDX).
pub const VRING_USED_F_NO_NOTIFY: u16 = 1;
/// Avail-ring flag: the driver does not need interrupts (without EVENT_IDX).
pub const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Largest split queue size the spec allows.
pub const MAX_QUEUE_SIZE: u16 = 32768;

const DESC_SIZE: usize = 16;
const PAGE: usize = 4096;

/// Where the three parts of a split ring sit, as byte offsets from the ring's base.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingLayout {
    /// Number of descriptors (a power of two).
    pub size: u16,
    /// Offset of the descriptor table (16-byte entries).
    pub desc: usize,
    /// Offset of the available ring: flags, idx, ring[size], used_event.
    pub avail: usize,
    /// Offset of the used ring: flags, idx, ring[size] of (id, len), avail_event.
    pub used: usize,
    /// Total bytes, a whole number of pages.
    pub total: usize,
}

impl RingLayout {
    /// Lays out a ring of `size` descriptors.
    pub fn new(size: u16) -> Result<Self> {
        if size == 0 || !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
            return Err(Error::InvalidJob(format!("queue size {size} is not a power of two in 1..=32768")));
        }
        let n = usize::from(size);
        let desc = 0;
        let avail = (desc + DESC_SIZE * n).next_multiple_of(64);
        let avail_len = 4 + 2 * n + 2;
        let used = (avail + avail_len).next_multiple_of(PAGE);
        let used_len = 4 + 8 * n + 2;
        let total = (used + used_len).next_multiple_of(PAGE);
        Ok(RingLayout { size, desc, avail, used, total })
    }

    /// Offset of `used_event` (the last avail-ring field).
    pub fn used_event(&self) -> usize {
        self.avail + 4 + 2 * usize::from(self.size)
    }

    /// Offset of `avail_event` (the last used-ring field).
    pub fn avail_event(&self) -> usize {
        self.used + 4 + 8 * usize::from(self.size)
    }
}

/// `vring_need_event` from the spec: should the other side be notified, given that it asked to
/// be notified when the index passes `event`, and the index moved from `old` to `new`?
#[inline]
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// One buffer of a descriptor chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// True if the device writes it.
    pub write: bool,
}

/// One descriptor of a raw chain, as the table entry will hold it except for chaining: the
/// `VRING_DESC_F_NEXT` flag and the `next` field are set from the position in the chain (a
/// caller's `NEXT` bit is ignored, so a raw chain can never loop or run into other chains).
/// Everything else is written as given, however wrong: this is how malformed requests are made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawDesc {
    /// Guest physical address (not checked against the shared memory).
    pub addr: u64,
    /// Length in bytes (may be zero).
    pub len: u32,
    /// Flags, e.g. [`VRING_DESC_F_WRITE`] (any bit but `NEXT` is passed through).
    pub flags: u16,
}

impl RawDesc {
    /// A buffer the device reads.
    pub fn readable(addr: u64, len: u32) -> Self {
        RawDesc { addr, len, flags: 0 }
    }

    /// A buffer the device writes.
    pub fn writable(addr: u64, len: u32) -> Self {
        RawDesc { addr, len, flags: VRING_DESC_F_WRITE }
    }
}

/// A descriptor table entry exactly as written, `next` and every flag included: for chains no
/// well-behaved driver makes (loops, `next` out of range, indirect tables), in the ring's table
/// ([`DriverRing::write_entry`]) or in memory ([`TableEntry::encode`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableEntry {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Flags (`NEXT`, `WRITE`, `INDIRECT`, anything).
    pub flags: u16,
    /// Index of the next descriptor (meaningful to the device only with `NEXT`).
    pub next: u16,
}

impl TableEntry {
    /// The 16 bytes of the entry (virtio 1.x `struct virtq_desc`, little endian).
    pub fn encode(&self) -> [u8; DESC_SIZE] {
        let mut raw = [0u8; DESC_SIZE];
        raw[0..8].copy_from_slice(&self.addr.to_le_bytes());
        raw[8..12].copy_from_slice(&self.len.to_le_bytes());
        raw[12..14].copy_from_slice(&self.flags.to_le_bytes());
        raw[14..16].copy_from_slice(&self.next.to_le_bytes());
        raw
    }
}

/// Bytes of one descriptor table entry.
pub const DESC_BYTES: usize = DESC_SIZE;

/// One entry taken from the used ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsedElem {
    /// Head descriptor index of the completed chain.
    pub id: u32,
    /// Bytes the device says it wrote.
    pub len: u32,
}

/// The driver's view of a split ring living in shared memory.
pub struct DriverRing {
    base: *mut u8,
    layout: RingLayout,
    event_idx: bool,
    /// Next avail index to fill (not yet visible to the device until published).
    avail_shadow: u16,
    /// Avail index at the last kick decision.
    kick_old: u16,
    /// Next used index to consume.
    last_used: u16,
}

// SAFETY: the ring memory is owned by whoever owns the DriverRing (see `DriverRing::new`).
unsafe impl Send for DriverRing {}

impl DriverRing {
    /// Wraps ring memory at `base`, laid out by `layout`, and resets it (all zero).
    ///
    /// # Safety
    /// `base` must point to at least `layout.total` writable bytes, aligned to 16, that stay
    /// valid for the lifetime of the returned value and that nothing else on this side uses.
    pub unsafe fn new(base: *mut u8, layout: RingLayout, event_idx: bool) -> Self {
        // SAFETY: the caller guarantees `layout.total` writable bytes at `base`.
        unsafe { std::ptr::write_bytes(base, 0, layout.total) };
        DriverRing { base, layout, event_idx, avail_shadow: 0, kick_old: 0, last_used: 0 }
    }

    /// The layout.
    pub fn layout(&self) -> RingLayout {
        self.layout
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.layout.size
    }

    fn u16_at(&self, off: usize) -> &AtomicU16 {
        debug_assert!(off + 2 <= self.layout.total && off.is_multiple_of(2));
        // SAFETY: in bounds and 2-aligned (layout offsets are even and base is 16-aligned);
        // AtomicU16 has the layout of u16 and the memory is only accessed atomically or
        // volatilely by the two sides.
        unsafe { &*self.base.add(off).cast::<AtomicU16>() }
    }

    /// Writes descriptor `idx`.
    fn write_desc(&mut self, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.write_entry(idx, TableEntry { addr, len, flags, next });
    }

    /// Writes descriptor `idx` of the table exactly as given (no check of the address, length,
    /// flags or `next`): with [`Self::push_head`], chains of any shape, loops included. The
    /// caller must not overwrite a descriptor the device still holds.
    pub fn write_entry(&mut self, idx: u16, entry: TableEntry) {
        assert!(idx < self.layout.size, "descriptor index out of range");
        let off = self.layout.desc + DESC_SIZE * usize::from(idx);
        // SAFETY: in bounds (checked above); the device does not read this descriptor until it
        // is published by the Release store in `publish`.
        unsafe { std::ptr::write_volatile(self.base.add(off).cast::<[u8; DESC_SIZE]>(), entry.encode()) };
    }

    /// Places `head` in the next avail slot (visible to the device after [`Self::publish`]),
    /// whatever its descriptors hold.
    pub fn push_head(&mut self, head: u16) {
        assert!(head < self.layout.size, "descriptor index out of range");
        let slot = usize::from(self.avail_shadow & (self.layout.size - 1));
        let off = self.layout.avail + 4 + 2 * slot;
        self.u16_at(off).store(head.to_le(), Ordering::Relaxed);
        self.avail_shadow = self.avail_shadow.wrapping_add(1);
    }

    /// Reads descriptor `idx` back: (addr, len, flags, next). For tests and diagnostics.
    pub fn read_desc(&self, idx: u16) -> (u64, u32, u16, u16) {
        assert!(idx < self.layout.size, "descriptor index out of range");
        read_desc_raw(self.base, self.layout, idx)
    }

    /// Writes `segs` into descriptors `head, head + 1, ...` chained in that order, and places
    /// `head` in the next avail slot. Nothing is visible to the device before [`Self::publish`].
    pub fn push_chain(&mut self, head: u16, segs: &[Segment]) {
        self.push_descs(head, segs.len(), |i| {
            let seg = segs[i];
            (seg.addr, seg.len, if seg.write { VRING_DESC_F_WRITE } else { 0 })
        });
    }

    /// Like [`Self::push_chain`], but the descriptors are written exactly as given (addresses,
    /// lengths and flags unchecked; only the chaining is ours): for malformed requests.
    pub fn push_raw_chain(&mut self, head: u16, descs: &[RawDesc]) {
        self.push_descs(head, descs.len(), |i| {
            let d = descs[i];
            (d.addr, d.len, d.flags & !VRING_DESC_F_NEXT)
        });
    }

    /// Writes `n` descriptors `head..head + n`, the `i`th being `desc(i)` = (addr, len, flags
    /// without NEXT), chains them in that order and places `head` in the next avail slot.
    fn push_descs(&mut self, head: u16, n: usize, desc: impl Fn(usize) -> (u64, u32, u16)) {
        assert!(n > 0, "empty descriptor chain");
        let last = usize::from(head) + n - 1;
        assert!(last < usize::from(self.layout.size), "descriptor chain runs past the table");
        for i in 0..n {
            let idx = head + i as u16;
            let (addr, len, mut flags) = desc(i);
            let mut next = 0;
            if i + 1 < n {
                flags |= VRING_DESC_F_NEXT;
                next = idx + 1;
            }
            self.write_desc(idx, addr, len, flags, next);
        }
        self.push_head(head);
    }

    /// Number of chains pushed since the last publish.
    pub fn unpublished(&self) -> u16 {
        let published = u16::from_le(self.u16_at(self.layout.avail + 2).load(Ordering::Relaxed));
        self.avail_shadow.wrapping_sub(published)
    }

    /// Makes all pushed chains visible to the device and says whether it must be kicked
    /// (honouring `VRING_USED_F_NO_NOTIFY`, or `avail_event` with EVENT_IDX).
    pub fn publish(&mut self) -> bool {
        let new = self.avail_shadow;
        self.u16_at(self.layout.avail + 2).store(new.to_le(), Ordering::Release);
        // The device may be about to go to sleep: our idx store must be visible before we read
        // its suppression state, or both sides may wait for each other.
        fence(Ordering::SeqCst);
        let old = self.kick_old;
        self.kick_old = new;
        if old == new {
            return false;
        }
        if self.event_idx {
            let event = u16::from_le(self.u16_at(self.layout.avail_event()).load(Ordering::Relaxed));
            need_event(event, new, old)
        } else {
            let flags = u16::from_le(self.u16_at(self.layout.used).load(Ordering::Relaxed));
            flags & VRING_USED_F_NO_NOTIFY == 0
        }
    }

    /// Stores `idx` as the avail index, whatever was pushed: for a hostile client that claims
    /// more entries than the queue holds. Nothing else on this side changes.
    pub fn force_avail_index(&mut self, idx: u16) {
        self.u16_at(self.layout.avail + 2).store(idx.to_le(), Ordering::Release);
        fence(Ordering::SeqCst);
    }

    /// True if the device has completed something we have not consumed yet.
    pub fn has_used(&self) -> bool {
        u16::from_le(self.u16_at(self.layout.used + 2).load(Ordering::Acquire)) != self.last_used
    }

    /// Takes the next used element, if any. `outstanding` is the number of chains the device
    /// holds; a used index that runs ahead of that is a protocol violation.
    pub fn pop_used(&mut self, outstanding: usize) -> Result<Option<UsedElem>> {
        let used_idx = u16::from_le(self.u16_at(self.layout.used + 2).load(Ordering::Acquire));
        let pending = used_idx.wrapping_sub(self.last_used);
        if pending == 0 {
            return Ok(None);
        }
        if usize::from(pending) > outstanding {
            return Err(Error::Protocol(format!(
                "used index moved from {} to {} with only {} request(s) outstanding",
                self.last_used, used_idx, outstanding
            )));
        }
        let slot = usize::from(self.last_used & (self.layout.size - 1));
        let off = self.layout.used + 4 + 8 * slot;
        // SAFETY: in bounds of the used ring; the Acquire load of the used index above orders
        // this read after the device's write of the element.
        let raw = unsafe { std::ptr::read_volatile(self.base.add(off).cast::<[u8; 8]>()) };
        self.last_used = self.last_used.wrapping_add(1);
        let id = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
        let len = u32::from_le_bytes([raw[4], raw[5], raw[6], raw[7]]);
        Ok(Some(UsedElem { id, len }))
    }

    /// Asks the device to signal the call eventfd on the next completion. Call before sleeping,
    /// then check [`Self::has_used`] again (a completion may have raced with this).
    pub fn enable_notify(&mut self) {
        if self.event_idx {
            self.u16_at(self.layout.used_event()).store(self.last_used.to_le(), Ordering::Relaxed);
        } else {
            self.u16_at(self.layout.avail).store(0, Ordering::Relaxed);
        }
        fence(Ordering::SeqCst);
    }

    /// Asks the device not to signal (we are polling). With EVENT_IDX this is a no-op: the
    /// `used_event` we last set has already been passed, so the device stays quiet.
    pub fn disable_notify(&mut self) {
        if !self.event_idx {
            self.u16_at(self.layout.avail).store(VRING_AVAIL_F_NO_INTERRUPT.to_le(), Ordering::Relaxed);
        }
    }

    /// Next used index we will consume (for diagnostics).
    pub fn last_used(&self) -> u16 {
        self.last_used
    }

    /// Next avail index we will fill.
    pub fn avail_idx(&self) -> u16 {
        self.avail_shadow
    }
}

fn read_desc_raw(base: *mut u8, layout: RingLayout, idx: u16) -> (u64, u32, u16, u16) {
    let off = layout.desc + DESC_SIZE * usize::from(idx);
    // SAFETY: `idx < layout.size` is checked by callers, so the read is inside the ring memory.
    let raw = unsafe { std::ptr::read_volatile(base.add(off).cast::<[u8; DESC_SIZE]>()) };
    let addr = u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
    let len = u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default());
    let flags = u16::from_le_bytes([raw[12], raw[13]]);
    let next = u16::from_le_bytes([raw[14], raw[15]]);
    (addr, len, flags, next)
}

/// A minimal device side of a split ring, for tests: pops avail chains and pushes used entries.
#[cfg(test)]
pub(crate) mod sim {
    use super::*;

    /// (addr, len, flags) of one descriptor.
    pub type SimDesc = (u64, u32, u16);

    pub struct SimDevice {
        base: *mut u8,
        layout: RingLayout,
        event_idx: bool,
        last_avail: u16,
        used_idx: u16,
        signalled_at: u16,
    }

    impl SimDevice {
        /// # Safety
        /// Same memory as the `DriverRing` under test, alive for as long as this value.
        pub unsafe fn new(base: *mut u8, layout: RingLayout, event_idx: bool) -> Self {
            SimDevice { base, layout, event_idx, last_avail: 0, used_idx: 0, signalled_at: 0 }
        }

        fn u16_at(&self, off: usize) -> &AtomicU16 {
            // SAFETY: see DriverRing::u16_at; same memory.
            unsafe { &*self.base.add(off).cast::<AtomicU16>() }
        }

        /// Pops one chain: (head, segments with flags).
        pub fn pop(&mut self) -> Option<(u16, Vec<SimDesc>)> {
            let avail_idx = u16::from_le(self.u16_at(self.layout.avail + 2).load(Ordering::Acquire));
            if avail_idx == self.last_avail {
                return None;
            }
            let slot = usize::from(self.last_avail & (self.layout.size - 1));
            let head = u16::from_le(self.u16_at(self.layout.avail + 4 + 2 * slot).load(Ordering::Relaxed));
            self.last_avail = self.last_avail.wrapping_add(1);
            let mut segs = Vec::new();
            let mut idx = head;
            loop {
                assert!(idx < self.layout.size);
                let (addr, len, flags, next) = read_desc_raw(self.base, self.layout, idx);
                segs.push((addr, len, flags));
                if flags & VRING_DESC_F_NEXT == 0 {
                    break;
                }
                assert!(segs.len() <= usize::from(self.layout.size), "descriptor loop");
                idx = next;
            }
            Some((head, segs))
        }

        /// Pushes a used element; returns whether the driver wants a signal.
        pub fn push(&mut self, id: u16, len: u32) -> bool {
            let slot = usize::from(self.used_idx & (self.layout.size - 1));
            let off = self.layout.used + 4 + 8 * slot;
            let mut raw = [0u8; 8];
            raw[0..4].copy_from_slice(&u32::from(id).to_le_bytes());
            raw[4..8].copy_from_slice(&len.to_le_bytes());
            // SAFETY: in bounds of the used ring.
            unsafe { std::ptr::write_volatile(self.base.add(off).cast::<[u8; 8]>(), raw) };
            let old = self.used_idx;
            self.used_idx = self.used_idx.wrapping_add(1);
            self.u16_at(self.layout.used + 2).store(self.used_idx.to_le(), Ordering::Release);
            fence(Ordering::SeqCst);
            if self.event_idx {
                let ev = u16::from_le(self.u16_at(self.layout.used_event()).load(Ordering::Relaxed));
                let want = need_event(ev, self.used_idx, old);
                if want {
                    self.signalled_at = self.used_idx;
                }
                want
            } else {
                u16::from_le(self.u16_at(self.layout.avail).load(Ordering::Relaxed)) & VRING_AVAIL_F_NO_INTERRUPT == 0
            }
        }

        /// Sets the used-ring flags (e.g. NO_NOTIFY).
        pub fn set_used_flags(&self, flags: u16) {
            self.u16_at(self.layout.used).store(flags.to_le(), Ordering::Relaxed);
        }

        /// Sets avail_event (EVENT_IDX): kick me when avail idx passes `ev`.
        pub fn set_avail_event(&self, ev: u16) {
            self.u16_at(self.layout.avail_event()).store(ev.to_le(), Ordering::Relaxed);
        }

        pub fn last_avail(&self) -> u16 {
            self.last_avail
        }
    }
}

#[cfg(test)]
mod tests {
    use super::sim::SimDevice;
    use super::*;

    struct Mem(Vec<u128>);
    impl Mem {
        fn new(layout: RingLayout) -> Self {
            Mem(vec![0u128; layout.total / 16])
        }
        fn ptr(&mut self) -> *mut u8 {
            self.0.as_mut_ptr().cast()
        }
    }

    fn seg(addr: u64, len: u32, write: bool) -> Segment {
        Segment { addr, len, write }
    }

    #[test]
    fn layout_is_aligned_and_disjoint() {
        for size in [1u16, 2, 64, 128, 256, 1024, 32768] {
            let l = RingLayout::new(size).unwrap();
            let n = usize::from(size);
            assert_eq!(l.desc % 16, 0);
            assert_eq!(l.avail % 2, 0);
            assert_eq!(l.used % 4096, 0);
            assert!(l.desc + 16 * n <= l.avail);
            assert!(l.used_event() + 2 <= l.used);
            assert!(l.avail_event() + 2 <= l.total);
            assert_eq!(l.total % 4096, 0);
        }
        assert!(RingLayout::new(0).is_err());
        assert!(RingLayout::new(96).is_err());
    }

    #[test]
    fn need_event_matches_spec_examples() {
        // Device asked to be told once idx passes 5: moving 4 -> 6 crosses it.
        assert!(need_event(5, 6, 4));
        assert!(need_event(5, 6, 5));
        assert!(!need_event(5, 5, 4));
        assert!(!need_event(7, 6, 4));
        // Wraparound of the u16 counters.
        assert!(need_event(0xffff, 1, 0xfffe));
        assert!(need_event(0, 1, 0xffff));
        assert!(!need_event(2, 1, 0xffff));
    }

    #[test]
    fn descriptor_chaining() {
        let layout = RingLayout::new(16).unwrap();
        let mut mem = Mem::new(layout);
        // SAFETY: mem holds layout.total bytes, 16-aligned, alive for the test.
        let mut ring = unsafe { DriverRing::new(mem.ptr(), layout, false) };
        // SAFETY: same memory.
        let mut dev = unsafe { SimDevice::new(mem.ptr(), layout, false) };
        ring.push_chain(3, &[seg(0x1000, 16, false), seg(0x2000, 4096, true), seg(0x3000, 1, true)]);
        ring.push_chain(6, &[seg(0x4000, 16, false), seg(0x5000, 1, true)]);
        assert_eq!(ring.unpublished(), 2);
        assert!(dev.pop().is_none(), "nothing visible before publish");
        assert!(ring.publish());
        assert_eq!(ring.unpublished(), 0);
        let (head, segs) = dev.pop().unwrap();
        assert_eq!(head, 3);
        assert_eq!(
            segs,
            vec![
                (0x1000, 16, VRING_DESC_F_NEXT),
                (0x2000, 4096, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE),
                (0x3000, 1, VRING_DESC_F_WRITE)
            ]
        );
        assert_eq!(ring.read_desc(3).3, 4);
        assert_eq!(ring.read_desc(4).3, 5);
        let (head, segs) = dev.pop().unwrap();
        assert_eq!(head, 6);
        assert_eq!(segs, vec![(0x4000, 16, VRING_DESC_F_NEXT), (0x5000, 1, VRING_DESC_F_WRITE)]);
        assert!(dev.pop().is_none());
    }

    #[test]
    fn raw_chains_keep_their_flags_and_lengths() {
        let layout = RingLayout::new(16).unwrap();
        let mut mem = Mem::new(layout);
        // SAFETY: mem holds layout.total bytes, 16-aligned, alive for the test.
        let mut ring = unsafe { DriverRing::new(mem.ptr(), layout, false) };
        // SAFETY: same memory.
        let mut dev = unsafe { SimDevice::new(mem.ptr(), layout, false) };
        // A writable header, a zero-length buffer, an address past any memory, a readable
        // status, and a NEXT bit on the last descriptor that must not make the chain go on.
        ring.push_raw_chain(
            0,
            &[
                RawDesc::writable(0x1000, 8),
                RawDesc::readable(0x2000, 0),
                RawDesc { addr: u64::MAX - 10, len: 512, flags: VRING_DESC_F_WRITE | 0x40 },
                RawDesc { addr: 0x3000, len: 1, flags: VRING_DESC_F_NEXT },
            ],
        );
        // A single-descriptor chain right after it.
        ring.push_raw_chain(4, &[RawDesc::readable(0x4000, 16)]);
        assert!(ring.publish());
        let (head, segs) = dev.pop().unwrap();
        assert_eq!(head, 0);
        assert_eq!(
            segs,
            vec![
                (0x1000, 8, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE),
                (0x2000, 0, VRING_DESC_F_NEXT),
                (u64::MAX - 10, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE | 0x40),
                (0x3000, 1, 0),
            ]
        );
        assert_eq!(ring.read_desc(3), (0x3000, 1, 0, 0), "the last descriptor ends the chain");
        assert_eq!(dev.pop().unwrap(), (4, vec![(0x4000, 16, 0)]));
        assert!(dev.pop().is_none());
        // The same buffers through push_chain and push_raw_chain give the same table entries.
        ring.push_chain(8, &[seg(0x5000, 16, false), seg(0x6000, 512, true), seg(0x7000, 1, true)]);
        ring.push_raw_chain(
            12,
            &[RawDesc::readable(0x5000, 16), RawDesc::writable(0x6000, 512), RawDesc::writable(0x7000, 1)],
        );
        for i in 0..3 {
            let (a, b) = (ring.read_desc(8 + i), ring.read_desc(12 + i));
            assert_eq!((a.0, a.1, a.2), (b.0, b.1, b.2));
        }
    }

    #[test]
    fn table_entries_are_written_exactly_even_when_they_loop() {
        let layout = RingLayout::new(8).unwrap();
        let mut mem = Mem::new(layout);
        // SAFETY: mem holds layout.total bytes, 16-aligned, alive for the test.
        let mut ring = unsafe { DriverRing::new(mem.ptr(), layout, false) };
        // A chain 5 -> 6 -> 6 -> ... (a loop) and an indirect descriptor.
        let a = TableEntry { addr: 0x1000, len: 72, flags: VRING_DESC_F_NEXT, next: 6 };
        let b = TableEntry { addr: 0x2000, len: 4, flags: VRING_DESC_F_NEXT | 0x80, next: 6 };
        let ind = TableEntry { addr: 0x3000, len: 48, flags: VRING_DESC_F_INDIRECT, next: 0xffff };
        ring.write_entry(5, a);
        ring.write_entry(6, b);
        ring.write_entry(7, ind);
        ring.push_head(5);
        ring.push_head(7);
        assert_eq!(ring.unpublished(), 2);
        assert!(ring.publish());
        assert_eq!(ring.read_desc(5), (0x1000, 72, VRING_DESC_F_NEXT, 6));
        assert_eq!(ring.read_desc(6), (0x2000, 4, VRING_DESC_F_NEXT | 0x80, 6));
        assert_eq!(ring.read_desc(7), (0x3000, 48, VRING_DESC_F_INDIRECT, 0xffff));
        // The avail ring holds the heads in order.
        let avail = |slot: usize| u16::from_le(ring.u16_at(layout.avail + 4 + 2 * slot).load(Ordering::Relaxed));
        assert_eq!((avail(0), avail(1)), (5, 7));
        let raw = ind.encode();
        assert_eq!(&raw[0..8], &0x3000u64.to_le_bytes());
        assert_eq!(&raw[8..12], &48u32.to_le_bytes());
        assert_eq!(&raw[12..16], &[4, 0, 0xff, 0xff]);
    }

    #[test]
    #[should_panic(expected = "past the table")]
    fn raw_chain_past_table_end_panics() {
        let layout = RingLayout::new(4).unwrap();
        let mut mem = Mem::new(layout);
        // SAFETY: mem holds layout.total bytes, 16-aligned, alive for the test.
        let mut ring = unsafe { DriverRing::new(mem.ptr(), layout, false) };
        ring.push_raw_chain(0, &[RawDesc::readable(0, 1); 5]);
    }

    #[test]
    #[should_panic(expected = "past the table")]
    fn chain_past_table_end_panics() {
        let layout = RingLayout::new(4).unwrap();
        let mut mem = Mem::new(layout);
        // SAFETY: mem holds layout.total bytes, 16-aligned, alive for the test.
        let mut ring = unsafe { DriverRing::new(mem.ptr(), layout, false) };
        ring.push_chain(3, &[seg(0, 1, false), seg(0, 1, true)]);
    }

    /// Runs far more than 65536 requests through a small ring so every index wraps several
    /// times, with a varying number in flight, checking that each completion comes back once.
    fn run_wraparound(event_idx: bool) {
        let size = 8u16;
        let layout = RingLayout::new(size).unwrap();
        let mut mem = Mem::new(layout);
        // SAFETY: mem holds layout.total bytes, 16-aligned, alive for the test.
        let mut ring = unsafe { DriverRing::new(mem.ptr(), layout, event_idx) };
        // SAFETY: same memory.
        let mut dev = unsafe { SimDevice::new(mem.ptr(), layout, event_idx) };
        let slots = 4u16; // 2 descriptors each
        let mut free: Vec<u16> = (0..slots).collect();
        let mut outstanding = 0usize;
        let mut submitted = 0u64;
        let mut completed = 0u64;
        let mut seq = [0u64; 4];
        let mut kicks = 0u64;
        let total = 200_000u64;
        let mut step = 0u64;
        while completed < total {
            step += 1;
            // Submit a varying batch.
            let batch = (step % 3) as usize + 1;
            for _ in 0..batch {
                if submitted >= total {
                    break;
                }
                let Some(s) = free.pop() else { break };
                seq[usize::from(s)] = submitted;
                ring.push_chain(s * 2, &[seg(submitted, 16, false), seg(0, 1, true)]);
                submitted += 1;
                outstanding += 1;
            }
            if ring.publish() {
                kicks += 1;
            }
            if event_idx {
                dev.set_avail_event(dev.last_avail());
            }
            // Device completes a varying number, in order.
            let n = (step % 4) as usize;
            for _ in 0..n {
                let Some((head, segs)) = dev.pop() else { break };
                assert_eq!(segs[0].0, seq[usize::from(head / 2)], "chain content");
                dev.push(head, 1);
            }
            while let Some(u) = ring.pop_used(outstanding).unwrap() {
                assert_eq!(u.id % 2, 0);
                let s = (u.id / 2) as u16;
                assert!(!free.contains(&s), "completion for a free slot");
                free.push(s);
                outstanding -= 1;
                completed += 1;
            }
        }
        assert_eq!(outstanding, 0);
        assert!(ring.avail_idx() == (total % 65536) as u16);
        assert!(ring.last_used() == (total % 65536) as u16);
        assert!(kicks > 0);
    }

    #[test]
    fn index_wraparound_plain() {
        run_wraparound(false);
    }

    #[test]
    fn index_wraparound_event_idx() {
        run_wraparound(true);
    }

    #[test]
    fn kick_suppression_no_notify_flag() {
        let layout = RingLayout::new(8).unwrap();
        let mut mem = Mem::new(layout);
        // SAFETY: mem holds layout.total bytes, 16-aligned, alive for the test.
        let mut ring = unsafe { DriverRing::new(mem.ptr(), layout, false) };
        // SAFETY: same memory.
        let dev = unsafe { SimDevice::new(mem.ptr(), layout, false) };
        ring.push_chain(0, &[seg(0, 1, true)]);
        assert!(ring.publish());
        assert!(!ring.publish(), "nothing new, no kick");
        dev.set_used_flags(VRING_USED_F_NO_NOTIFY);
        ring.push_chain(1, &[seg(0, 1, true)]);
        assert!(!ring.publish());
        dev.set_used_flags(0);
        ring.push_chain(2, &[seg(0, 1, true)]);
        assert!(ring.publish());
    }

    #[test]
    fn kick_suppression_event_idx() {
        let layout = RingLayout::new(8).unwrap();
        let mut mem = Mem::new(layout);
        // SAFETY: mem holds layout.total bytes, 16-aligned, alive for the test.
        let mut ring = unsafe { DriverRing::new(mem.ptr(), layout, true) };
        // SAFETY: same memory.
        let dev = unsafe { SimDevice::new(mem.ptr(), layout, true) };
        // avail_event 0: kick when idx passes 0.
        ring.push_chain(0, &[seg(0, 1, true)]);
        assert!(ring.publish());
        // Device is polling and only wants a kick once idx passes 5.
        dev.set_avail_event(5);
        ring.push_chain(1, &[seg(0, 1, true)]);
        assert!(!ring.publish()); // 1 -> 2
        for i in 0..3 {
            ring.push_chain(2 + i, &[seg(0, 1, true)]);
        }
        assert!(!ring.publish()); // 2 -> 5
        ring.push_chain(5, &[seg(0, 1, true)]);
        assert!(ring.publish()); // 5 -> 6 passes 5
    }

    #[test]
    fn interrupt_suppression() {
        let layout = RingLayout::new(8).unwrap();
        let mut mem = Mem::new(layout);
        // SAFETY: mem holds layout.total bytes, 16-aligned, alive for the test.
        let mut ring = unsafe { DriverRing::new(mem.ptr(), layout, false) };
        // SAFETY: same memory.
        let mut dev = unsafe { SimDevice::new(mem.ptr(), layout, false) };
        ring.disable_notify();
        assert!(!dev.push(0, 1));
        ring.enable_notify();
        assert!(dev.push(0, 1));

        let mut mem = Mem::new(layout);
        // SAFETY: as above.
        let mut ring = unsafe { DriverRing::new(mem.ptr(), layout, true) };
        // SAFETY: as above.
        let mut dev = unsafe { SimDevice::new(mem.ptr(), layout, true) };
        ring.enable_notify(); // used_event = 0: signal on the first completion
        assert!(dev.push(0, 1));
        ring.pop_used(1).unwrap().unwrap();
        ring.disable_notify();
        assert!(!dev.push(0, 1), "used_event already passed");
        ring.pop_used(1).unwrap().unwrap();
        ring.enable_notify();
        assert!(dev.push(0, 1));
    }

    #[test]
    fn used_index_running_ahead_is_an_error() {
        let layout = RingLayout::new(8).unwrap();
        let mut mem = Mem::new(layout);
        // SAFETY: mem holds layout.total bytes, 16-aligned, alive for the test.
        let mut ring = unsafe { DriverRing::new(mem.ptr(), layout, false) };
        // SAFETY: same memory.
        let mut dev = unsafe { SimDevice::new(mem.ptr(), layout, false) };
        dev.push(0, 0);
        dev.push(0, 0);
        assert!(matches!(ring.pop_used(1), Err(Error::Protocol(_))));
    }
}
