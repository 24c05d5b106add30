//! The channel between the reflector and a driver VM: one shared memory
//! region (a memfd the reflector creates and the vmm maps as a window) with
//! a request ring, a completion ring and bounce slots.
//!
//! ```text
//! 0x0000  header: magic, version, generation, geometry, ring indices,
//!         notification flags (each index on its own 64-byte line)
//! 0x1000  request ring:    RING_SIZE x RequestEntry    (reflector -> driver)
//!         completion ring: RING_SIZE x CompletionEntry (driver -> reflector)
//! BOUNCE_OFFSET  bounce slots: SLOT_COUNT x SLOT_SIZE (the device's DMA region)
//! DEVICE_AREA_OFFSET  the device area: the driver's queues for its device
//! ```
//!
//! Data never passes through the driver: the reflector copies a write's
//! payload from client memory into the request's bounce slot; the driver
//! points the device's DMA at that slot; the reflector copies a read's
//! payload from the slot to client memory. Each in-flight request owns one
//! slot, and the slot number is part of its id, so the reflector can check
//! every completion against its own table.
//!
//! Everything the driver writes here is untrusted by the reflector.

/// [`MAGIC`] at offset 0.
pub const MAGIC: u64 = u64::from_le_bytes(*b"DRVMCHAN");
/// Layout version.
pub const VERSION: u32 = 3;

/// Entries in each ring and number of bounce slots: the most requests in
/// flight in one driver VM. A net device's frames in flight are bounded by
/// its slots, half for sending and half for receiving
/// (`reflector::net::slots`), and a slot comes back only once its frame
/// has crossed the card and the driver VM (about 300 us under load): with
/// 128, 64-byte frames through two net driver VMs peaked at 0.18-0.20 Mpps
/// (and 32 sending or receiving slots gave 0.10-0.15), with 256 at
/// 0.28-0.31 Mpps (1514-byte frames 0.17-0.18 against 0.24-0.25; net-load
/// 3 s, alternated twice). A block device uses [`BLOCK_SLOTS`] of them.
pub const RING_SIZE: u32 = 256;
/// The slots a block device uses (`0..BLOCK_SLOTS`), the most block
/// requests in flight in one driver VM: 128 covers QD32 from four queues, a
/// deeper queue would only add latency on a 2-core machine, and the NVMe
/// driver's queues hold 128 commands (`nvme::MAX_COMMANDS`).
pub const BLOCK_SLOTS: u32 = 128;
/// Bytes per bounce slot: the largest request the reflector forwards. The
/// reflector advertises `seg_max` x `size_max` = SLOT_SIZE to clients.
pub const SLOT_SIZE: u32 = 128 * 1024;
/// Number of bounce slots.
pub const SLOT_COUNT: u32 = RING_SIZE;

/// Header field offsets (bytes from the start of the region).
pub mod header {
    /// u64 [`super::MAGIC`].
    pub const MAGIC: usize = 0x00;
    /// u32 [`super::VERSION`].
    pub const VERSION: usize = 0x08;
    /// u32 generation, bumped by the reflector on every reset; a driver
    /// works only for the generation it attached to.
    pub const GENERATION: usize = 0x0c;
    /// u32 ring size.
    pub const RING_SIZE: usize = 0x10;
    /// u32 slot size.
    pub const SLOT_SIZE: usize = 0x14;
    /// u32 slot count.
    pub const SLOT_COUNT: usize = 0x18;
    /// u32 free-running count of requests published (reflector writes).
    pub const REQ_PROD: usize = 0x40;
    /// u32 free-running count of requests taken (driver writes).
    pub const REQ_CONS: usize = 0x80;
    /// u32 free-running count of completions published (driver writes).
    pub const CMP_PROD: usize = 0xc0;
    /// u32 free-running count of completions taken (reflector writes).
    pub const CMP_CONS: usize = 0x100;
    /// u32: nonzero while the driver may sleep; the reflector then raises
    /// the request interrupt after publishing.
    pub const DRIVER_SLEEPING: usize = 0x140;
    /// u32: nonzero while the reflector wants a doorbell after the driver
    /// publishes completions.
    pub const HOST_WAITING: usize = 0x180;
    /// u32 [`super::driver_state`] (driver writes).
    pub const DRIVER_STATE: usize = 0x1c0;
    /// u32 generation the driver attached to (driver writes).
    pub const DRIVER_GENERATION: usize = 0x1c4;
    /// u32 bit mask of the faults ([`super::inject`]) the driver can
    /// commit: bit `1 << kind` (driver writes at attach). The reflector
    /// refuses to inject any other kind into an attached driver.
    pub const DRIVER_INJECTABLE: usize = 0x1c8;
    /// u64: the address at which the device sees [`super::BOUNCE_OFFSET`]
    /// (its DMA range continues through the device area); 0 when the
    /// device uses the driver's own addresses. Written by the reflector.
    pub const DMA_ADDRESS: usize = 0x1d0;
    /// u32 fault the driver must commit, for tests ([`super::inject`]);
    /// written by the reflector, cleared when the channel is reset.
    pub const INJECT_KIND: usize = 0x200;
    /// u32 requests the driver serves before committing the fault
    /// (it counts them down).
    pub const INJECT_AFTER: usize = 0x204;
}

/// Faults a driver commits on request ([`header::INJECT_KIND`]), so that
/// tests and the chaos command can exercise every recovery path.
pub mod inject {
    /// Nothing to do.
    pub const NONE: u32 = 0;
    /// Panic.
    pub const PANIC: u32 = 1;
    /// Read an unmapped address (page fault).
    pub const PAGE_FAULT: u32 = 2;
    /// Execute an invalid instruction.
    pub const ILLEGAL: u32 = 3;
    /// Stop serving and spin forever.
    pub const HANG: u32 = 4;
    /// Complete a request with a length it did not have.
    pub const LIE: u32 = 5;
    /// Exit cleanly, as if the driver decided to stop.
    pub const STOP: u32 = 6;
    /// From now on, flip a bit of every read's data before answering OK
    /// (a driver that lies about data: only checksums catch it).
    pub const CORRUPT_READS: u32 = 7;
    /// From now on, answer every flush OK without flushing the device (a
    /// driver that lies about durability).
    pub const SKIP_FLUSHES: u32 = 8;
    /// From now on, never sleep: keep polling even with nothing to do (a
    /// driver that takes a core; only the reflector's CPU watch sees it).
    pub const SPIN: u32 = 9;
    /// From now on, ring the reflector's doorbell continuously while idle.
    pub const FLOOD: u32 = 10;
    /// From now on, point the device's DMA for data outside the region the
    /// reflector gave it (a driver reaching for memory it was not given).
    pub const WILD_DMA: u32 = 11;
    /// Now, set the device up again with its queues outside the region
    /// the reflector gave it (a driver reaching for memory it was not
    /// given with the device's own structures), and go on as if it worked.
    pub const WILD_QUEUES: u32 = 12;
    /// From now on, answer every write OK without giving it to the device
    /// (a driver that loses writes: only the device's own record of the
    /// writes it did shows it).
    pub const SKIP_WRITES: u32 = 13;
    /// From now on, keep the device busy with work no request asked for
    /// (reads of its own disk into a slot no request uses), sleeping while
    /// it works: a driver that spends the host's device threads instead of
    /// its own vCPU.
    pub const JUNK_IO: u32 = 14;
}

/// The [`header::DRIVER_INJECTABLE`] mask of `kinds`.
pub const fn injectable(kinds: &[u32]) -> u32 {
    let mut mask = 0;
    let mut i = 0;
    while i < kinds.len() {
        mask |= 1 << kinds[i];
        i += 1;
    }
    mask
}

/// Values of [`header::DRIVER_STATE`].
pub mod driver_state {
    /// Booting or resetting its device.
    pub const STARTING: u32 = 0;
    /// Serving requests of generation `DRIVER_GENERATION`.
    pub const READY: u32 = 1;
    /// Booted and found the channel of generation `DRIVER_GENERATION`;
    /// bringing its device to a known state. (Announced, like `READY`,
    /// with one doorbell ring: the reflector times its failovers by them.)
    pub const OPENED: u32 = 2;
}

/// Offset of the request ring.
pub const REQUEST_RING_OFFSET: usize = 0x1000;
/// Offset of the completion ring.
pub const COMPLETION_RING_OFFSET: usize = REQUEST_RING_OFFSET + RING_SIZE as usize * REQUEST_ENTRY_SIZE;
/// Offset of the bounce slots (page aligned).
pub const BOUNCE_OFFSET: usize =
    (COMPLETION_RING_OFFSET + RING_SIZE as usize * COMPLETION_ENTRY_SIZE).next_multiple_of(4096);
/// Offset of the device area: memory the driver gives its device for its
/// own structures (an NVMe controller's queues and PRP lists), right after
/// the bounce slots, so that one DMA range covers both.
pub const DEVICE_AREA_OFFSET: usize = BOUNCE_OFFSET + SLOT_COUNT as usize * SLOT_SIZE as usize;
/// Size of the device area.
pub const DEVICE_AREA_SIZE: usize = 64 * 1024;
/// The posted mirror: the page of the device area where a driver leaves
/// the value of each posted register write (`trap`: the dword at the
/// register's offset modulo 4096) before it writes the register. The
/// `nvme` driver's shadow doorbells live here, so an NVMe doorbell's
/// mirror is its shadow doorbell.
pub const POSTED_MIRROR_OFFSET: usize = DEVICE_AREA_OFFSET + 7 * 4096;
const _: () = assert!(POSTED_MIRROR_OFFSET + 4096 <= DEVICE_AREA_OFFSET + DEVICE_AREA_SIZE);
/// Total size of the region.
pub const REGION_SIZE: usize = DEVICE_AREA_OFFSET + DEVICE_AREA_SIZE;
/// Bytes a device may reach by DMA: the bounce slots and the device area.
pub const DMA_SIZE: usize = REGION_SIZE - BOUNCE_OFFSET;

/// Request operations (block ones in virtio-blk numbering).
pub mod op {
    /// Block: read from the medium into the slot.
    pub const READ: u32 = 0;
    /// Block: write the slot to the medium.
    pub const WRITE: u32 = 1;
    /// Block: make previous writes durable.
    pub const FLUSH: u32 = 4;
    /// Net: transmit the frame of `len` bytes in the slot.
    pub const NET_TX: u32 = 16;
    /// Net: receive one frame into the slot (up to `len` bytes); the
    /// completion's `len` is the frame's length.
    pub const NET_RX: u32 = 17;
}

/// Completion status (virtio-blk numbering).
pub mod status {
    /// Success.
    pub const OK: u32 = 0;
    /// The device failed the request.
    pub const IO_ERROR: u32 = 1;
    /// Not supported.
    pub const UNSUPPORTED: u32 = 2;
}

/// Size of a [`RequestEntry`].
pub const REQUEST_ENTRY_SIZE: usize = 32;
/// Size of a [`CompletionEntry`].
pub const COMPLETION_ENTRY_SIZE: usize = 16;

/// A request, written by the reflector.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestEntry {
    /// Request id: `sequence * SLOT_COUNT + slot`.
    pub id: u64,
    /// [`op`].
    pub op: u32,
    /// Bounce slot holding (or receiving) the data.
    pub slot: u32,
    /// Block: first 512-byte sector. Net: zero.
    pub sector: u64,
    /// Data length in bytes (0 for flush; a net receive's buffer size).
    pub len: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

/// A completion, written by the driver.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompletionEntry {
    /// Id of the request it completes.
    pub id: u64,
    /// [`status`].
    pub status: u32,
    /// Bytes transferred.
    pub len: u32,
}

/// The bounce slot an id refers to.
pub const fn slot_of(id: u64) -> u32 {
    (id % SLOT_COUNT as u64) as u32
}

/// Offset of a bounce slot in the region.
pub const fn slot_offset(slot: u32) -> usize {
    BOUNCE_OFFSET + slot as usize * SLOT_SIZE as usize
}

const _: () = {
    assert!(RING_SIZE.is_power_of_two());
    assert!(BLOCK_SLOTS <= SLOT_COUNT);
    assert!(core::mem::size_of::<RequestEntry>() == REQUEST_ENTRY_SIZE);
    assert!(core::mem::size_of::<CompletionEntry>() == COMPLETION_ENTRY_SIZE);
    assert!(header::INJECT_AFTER + 4 <= REQUEST_RING_OFFSET);
    assert!(REGION_SIZE.is_multiple_of(4096));
};
