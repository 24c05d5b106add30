//! The simulated network card's interface, as a driver sees it through its
//! `regs` window: registers, a transmit ring and a receive ring, each with a
//! completion ring, plus a doorbell (the driver writes it after posting
//! descriptors or changing registers) and an interrupt (the device raises it
//! after publishing completions, when the driver asked for interrupts).
//!
//! ```text
//! 0x0000  registers
//! 0x1000  TX ring:            MAX_RING x Descriptor  (driver -> device)
//! 0x2000  TX completion ring: MAX_RING x Completion  (device -> driver)
//! 0x3000  RX ring:            MAX_RING x Descriptor  (driver -> device)
//! 0x4000  RX completion ring: MAX_RING x Completion  (device -> driver)
//! ```
//!
//! A TX descriptor points at one whole Ethernet frame (no FCS); an RX
//! descriptor at a buffer that receives one whole frame. DMA addresses are
//! driver guest-physical; the device accepts only those inside the DMA
//! region it was given (the analogue of an IOMMU mapping) and fails the
//! descriptor otherwise. Frames that arrive while no RX buffer is posted
//! wait in the port's small FIFO, then are dropped and counted.
//!
//! A doorbell is a VM exit, so the device says when it needs none: while it
//! is awake ([`reg::DEVICE_POLLING`]), and, for RX buffers alone, unless
//! frames wait for them ([`reg::RX_WAITING`]). The driver writes its tails,
//! then (after a full fence) reads those registers; the device sets them,
//! then (after a full fence) reads the tails once more before it sleeps, so
//! one of the two always sees the other.

/// [`reg::MAGIC`] value: "SNIC".
pub const MAGIC: u32 = u32::from_le_bytes(*b"SNIC");
/// Interface version.
pub const VERSION: u32 = 1;
/// Shortest frame: an Ethernet header.
pub const MIN_FRAME: u32 = 14;
/// Longest frame: 1500-byte MTU, Ethernet header and one VLAN tag.
pub const MAX_FRAME: u32 = 1518;
/// Largest ring the device supports.
pub const MAX_RING: u32 = 256;
/// Size of the window.
pub const WINDOW_SIZE: usize = 0x5000;

/// Register offsets. Indices are free-running u32 counters, each on its own
/// 64-byte line.
pub mod reg {
    /// u32 [`super::MAGIC`] (read-only).
    pub const MAGIC: usize = 0x00;
    /// u32 [`super::VERSION`] (read-only).
    pub const VERSION: usize = 0x04;
    /// u64, the low 48 bits are the MAC address, first octet in the lowest
    /// byte (read-only).
    pub const MAC: usize = 0x08;
    /// u32 longest frame in bytes (read-only).
    pub const MAX_FRAME: usize = 0x10;
    /// u32 [`super::control`] (driver).
    pub const CONTROL: usize = 0x20;
    /// u32 [`super::status`] (device).
    pub const STATUS: usize = 0x24;
    /// u32 ring size of all four rings, power of two, set before enabling.
    pub const RING_SIZE: usize = 0x28;
    /// u32: the driver increments it to request a reset.
    pub const RESET_REQUEST: usize = 0x2c;
    /// u32: the device copies RESET_REQUEST here when the reset is done.
    pub const RESET_DONE: usize = 0x30;
    /// u32 why the device stopped ([`super::error`]) when STATUS has FATAL.
    pub const ERROR: usize = 0x34;
    /// u32 frames dropped because no RX buffer was posted (device).
    pub const RX_DROPPED: usize = 0x38;
    /// u32 TX ring tail (driver).
    pub const TX_TAIL: usize = 0x40;
    /// u32 TX ring head (device).
    pub const TX_HEAD: usize = 0x80;
    /// u32 TX completion tail (device).
    pub const TXC_TAIL: usize = 0xc0;
    /// u32 TX completion head (driver).
    pub const TXC_HEAD: usize = 0x100;
    /// u32 RX ring tail (driver).
    pub const RX_TAIL: usize = 0x140;
    /// u32 RX ring head (device).
    pub const RX_HEAD: usize = 0x180;
    /// u32 RX completion tail (device).
    pub const RXC_TAIL: usize = 0x1c0;
    /// u32 RX completion head (driver).
    pub const RXC_HEAD: usize = 0x200;
    /// u32 nonzero while the driver wants a completion interrupt (driver).
    pub const INTERRUPT_WANTED: usize = 0x240;
    /// u32 nonzero while the device is awake and will look at its TX tail
    /// (and, with frames waiting, its RX tail) again before it sleeps, so a
    /// doorbell is not needed (device).
    pub const DEVICE_POLLING: usize = 0x280;
    /// u32 nonzero while frames wait in the port's FIFO for RX buffers
    /// (device): posting RX buffers needs a doorbell only then. Otherwise
    /// the next frame from the wire finds them.
    pub const RX_WAITING: usize = 0x2c0;
}

/// Bits of [`reg::CONTROL`].
pub mod control {
    /// Move frames.
    pub const ENABLE: u32 = 1;
}

/// Bits of [`reg::STATUS`].
pub mod status {
    /// Enabled and moving frames.
    pub const READY: u32 = 1;
    /// Stopped on an error; see [`super::reg::ERROR`]. Only a reset clears it.
    pub const FATAL: u32 = 2;
    /// The port is connected (carrier). Independent of resets.
    pub const LINK_UP: u32 = 4;
}

/// Values of [`reg::ERROR`].
pub mod error {
    /// The ring size is not a power of two up to MAX_RING.
    pub const BAD_RING_SIZE: u32 = 1;
    /// A ring tail ran more than a ring ahead of its head.
    pub const BAD_TAIL: u32 = 2;
    /// A completion head ran ahead of its tail.
    pub const BAD_COMPLETION_HEAD: u32 = 3;
}

/// Offset of the TX ring.
pub const TX_RING_OFFSET: usize = 0x1000;
/// Offset of the TX completion ring.
pub const TX_COMPLETION_OFFSET: usize = 0x2000;
/// Offset of the RX ring.
pub const RX_RING_OFFSET: usize = 0x3000;
/// Offset of the RX completion ring.
pub const RX_COMPLETION_OFFSET: usize = 0x4000;

/// Completion status codes.
pub mod completion {
    /// Done: sent, or received `len` bytes.
    pub const SUCCESS: u16 = 0;
    /// The DMA range is outside the device's DMA region.
    pub const DMA_ERROR: u16 = 1;
    /// A TX frame shorter than MIN_FRAME or longer than MAX_FRAME, or an RX
    /// buffer shorter than MAX_FRAME.
    pub const BAD_LENGTH: u16 = 2;
}

/// A TX or RX descriptor.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// DMA address (driver guest-physical).
    pub addr: u64,
    /// TX: frame length; RX: buffer length.
    pub len: u32,
    /// Descriptor id, echoed in the completion.
    pub id: u16,
    /// Reserved, zero.
    pub reserved: u16,
}

/// A completion ring entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Completion {
    /// Descriptor id.
    pub id: u16,
    /// [`completion`] status.
    pub status: u16,
    /// TX: bytes sent; RX: frame length.
    pub len: u32,
}

/// Byte offset of entry `index` of the ring at `ring` with `ring_size` entries of `entry_size` bytes.
pub const fn ring_entry(ring: usize, index: u32, ring_size: u32, entry_size: usize) -> usize {
    ring + (index % ring_size) as usize * entry_size
}

/// The MAC address held in [`reg::MAC`].
pub const fn mac_from_register(value: u64) -> [u8; 6] {
    let b = value.to_le_bytes();
    [b[0], b[1], b[2], b[3], b[4], b[5]]
}

/// The [`reg::MAC`] value for a MAC address.
pub const fn mac_to_register(mac: [u8; 6]) -> u64 {
    u64::from_le_bytes([mac[0], mac[1], mac[2], mac[3], mac[4], mac[5], 0, 0])
}

const _: () = {
    assert!(core::mem::size_of::<Descriptor>() == 16);
    assert!(core::mem::size_of::<Completion>() == 8);
    assert!(reg::INTERRUPT_WANTED + 4 <= TX_RING_OFFSET);
    assert!(TX_RING_OFFSET + MAX_RING as usize * 16 <= TX_COMPLETION_OFFSET);
    assert!(TX_COMPLETION_OFFSET + MAX_RING as usize * 8 <= RX_RING_OFFSET);
    assert!(RX_RING_OFFSET + MAX_RING as usize * 16 <= RX_COMPLETION_OFFSET);
    assert!(RX_COMPLETION_OFFSET + MAX_RING as usize * 8 <= WINDOW_SIZE);
    assert!(WINDOW_SIZE.is_multiple_of(4096));
};
