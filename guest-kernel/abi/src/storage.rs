//! The simulated storage controller's interface, as a driver sees it through
//! its `regs` window: registers, a submission queue and a completion queue,
//! plus a doorbell (the driver writes it after queueing commands or changing
//! registers) and an interrupt (the device raises it when it completed
//! something and the driver asked for interrupts).
//!
//! ```text
//! 0x0000  registers
//! 0x1000  submission queue: MAX_QUEUE_DEPTH x Command     (driver -> device)
//! 0x3000  completion queue: MAX_QUEUE_DEPTH x Completion  (device -> driver)
//! ```
//!
//! DMA addresses in commands are driver guest-physical addresses; the device
//! accepts only those inside the DMA region it was given (the analogue of an
//! IOMMU mapping) and fails the command otherwise.

/// [`reg::MAGIC`] value: "SBLK".
pub const MAGIC: u32 = u32::from_le_bytes(*b"SBLK");
/// Interface version.
pub const VERSION: u32 = 1;
/// Sector size of the medium.
pub const SECTOR_SIZE: u32 = 512;
/// Deepest queue the device supports.
pub const MAX_QUEUE_DEPTH: u32 = 256;
/// Size of the window.
pub const WINDOW_SIZE: usize = 0x4000;

/// Register offsets.
pub mod reg {
    /// u32 [`super::MAGIC`] (read-only).
    pub const MAGIC: usize = 0x00;
    /// u32 [`super::VERSION`] (read-only).
    pub const VERSION: usize = 0x04;
    /// u64 capacity in sectors (read-only).
    pub const CAPACITY: usize = 0x08;
    /// u32 largest transfer of one command in bytes (read-only).
    pub const MAX_TRANSFER: usize = 0x10;
    /// u32 [`super::features`] (read-only).
    pub const FEATURES: usize = 0x14;
    /// u32 [`super::control`] (driver).
    pub const CONTROL: usize = 0x20;
    /// u32 [`super::status`] (device).
    pub const STATUS: usize = 0x24;
    /// u32 queue depth, power of two, set before enabling (driver).
    pub const QUEUE_DEPTH: usize = 0x28;
    /// u32: the driver increments it to request a reset.
    pub const RESET_REQUEST: usize = 0x2c;
    /// u32: the device copies RESET_REQUEST here when the reset is done.
    pub const RESET_DONE: usize = 0x30;
    /// u32 why the device stopped ([`super::error`]) when STATUS has FATAL.
    pub const ERROR: usize = 0x34;
    /// u32 free-running submission tail (driver).
    pub const SQ_TAIL: usize = 0x40;
    /// u32 free-running submission head (device).
    pub const SQ_HEAD: usize = 0x80;
    /// u32 free-running completion tail (device).
    pub const CQ_TAIL: usize = 0xc0;
    /// u32 free-running completion head (driver).
    pub const CQ_HEAD: usize = 0x100;
    /// u32 nonzero while the device is polling the submission queue, so a
    /// doorbell is not needed (device).
    pub const DEVICE_POLLING: usize = 0x140;
    /// u32 nonzero while the driver wants a completion interrupt (driver).
    pub const INTERRUPT_WANTED: usize = 0x180;
}

/// Bits of [`reg::CONTROL`].
pub mod control {
    /// Process the queues.
    pub const ENABLE: u32 = 1;
}

/// Bits of [`reg::STATUS`].
pub mod status {
    /// Enabled and processing the queues.
    pub const READY: u32 = 1;
    /// Stopped on an error; see [`super::reg::ERROR`]. Only a reset clears it.
    pub const FATAL: u32 = 2;
}

/// Bits of [`reg::FEATURES`].
pub mod features {
    /// The medium is read-only.
    pub const READ_ONLY: u32 = 1;
}

/// Values of [`reg::ERROR`].
pub mod error {
    /// The queue depth is not a power of two up to MAX_QUEUE_DEPTH.
    pub const BAD_QUEUE_DEPTH: u32 = 1;
    /// The submission tail ran more than a queue ahead of the head.
    pub const BAD_SQ_TAIL: u32 = 2;
    /// The completion head ran ahead of the tail.
    pub const BAD_CQ_HEAD: u32 = 3;
}

/// Offset of the submission queue.
pub const SQ_OFFSET: usize = 0x1000;
/// Offset of the completion queue.
pub const CQ_OFFSET: usize = 0x3000;

/// Command opcodes.
pub mod opcode {
    /// Medium -> DMA region.
    pub const READ: u16 = 1;
    /// DMA region -> medium.
    pub const WRITE: u16 = 2;
    /// Make writes durable.
    pub const FLUSH: u16 = 3;
}

/// Completion status codes.
pub mod completion {
    /// Done.
    pub const SUCCESS: u16 = 0;
    /// Unknown opcode or bad length.
    pub const INVALID: u16 = 1;
    /// The DMA address range is outside the device's DMA region.
    pub const DMA_ERROR: u16 = 2;
    /// The sector range is beyond the medium.
    pub const OUT_OF_RANGE: u16 = 3;
    /// The medium failed.
    pub const MEDIUM_ERROR: u16 = 4;
    /// A write to a read-only medium.
    pub const READ_ONLY: u16 = 5;
}

/// A submission queue entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Command {
    /// [`opcode`].
    pub opcode: u16,
    /// Command id, echoed in the completion.
    pub cid: u16,
    /// Transfer length in bytes (a multiple of SECTOR_SIZE).
    pub len: u32,
    /// First sector.
    pub lba: u64,
    /// DMA address (driver guest-physical).
    pub dma: u64,
    /// Reserved, zero.
    pub reserved: u64,
}

/// A completion queue entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Completion {
    /// Command id.
    pub cid: u16,
    /// [`completion`] status.
    pub status: u16,
    /// Bytes transferred.
    pub len: u32,
    /// Reserved, zero.
    pub reserved: u64,
}

const _: () = {
    assert!(core::mem::size_of::<Command>() == 32);
    assert!(core::mem::size_of::<Completion>() == 16);
    assert!(SQ_OFFSET + MAX_QUEUE_DEPTH as usize * 32 <= CQ_OFFSET);
    assert!(CQ_OFFSET + MAX_QUEUE_DEPTH as usize * 16 <= WINDOW_SIZE);
};
