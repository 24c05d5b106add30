//! An NVMe controller driver core, written to the NVMe base specification
//! (1.4): controller reset and enable, the admin queue, Identify, one I/O
//! queue pair, read, write and flush with PRP lists, interrupt masking, and
//! the shadow doorbell buffer (Doorbell Buffer Config) when the controller
//! offers it.
//!
//! It is `no_std` and reaches the controller only through two traits, so
//! the same code drives QEMU's NVMe model from a driver VM (registers in a
//! trapped MMIO window, DMA memory in the channel) and from a host test
//! (registers over qtest, DMA memory in the shared file):
//! [`Registers`] (BAR0) and [`DmaMemory`] (the memory the controller may
//! reach, and its address as the controller sees it).
//!
//! Not here: which requests to send (the driver's channel loop), where the
//! data comes from (bounce slots the reflector fills), and any trust in the
//! controller's answers beyond the phase bit and the command id (the
//! reflector judges what the driver reports).

#![no_std]

mod command;
mod controller;
mod queue;
pub mod regs;

pub use command::{Completion, Submission};
pub use controller::{Controller, IoCommand, Layout, Namespace};
pub use queue::QueuePair;

/// The controller's registers (BAR0), 32 bits at a time: the spec lets a
/// host access its 64-bit registers as two dwords, and a trapped window
/// then costs the same per access.
pub trait Registers {
    /// Reads the dword at `offset`.
    fn read32(&self, offset: usize) -> u32;
    /// Writes the dword at `offset`.
    fn write32(&self, offset: usize, value: u32);
}

/// Memory the controller reaches by DMA, as offsets into one region.
pub trait DmaMemory {
    /// The controller's address of region offset `offset` (what goes into
    /// a queue base register, a PRP entry).
    fn device_address(&self, offset: usize) -> u64;
    /// Copies `bytes` into the region at `offset`.
    fn write(&self, offset: usize, bytes: &[u8]);
    /// Copies the region at `offset` into `bytes`.
    fn read(&self, offset: usize, bytes: &mut [u8]);
}

/// Time, for the controller's timeouts (CAP.TO).
pub trait Clock {
    /// Microseconds since some fixed moment.
    fn now_us(&self) -> u64;
}

/// Memory page size the driver uses (CC.MPS = 0): 4 KiB, which every
/// controller supports (CAP.MPSMIN is at most 4 KiB by definition).
pub const PAGE: usize = 4096;

/// What went wrong with the controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// CSTS.RDY did not reach `ready` within CAP.TO.
    Timeout {
        /// The state waited for.
        ready: bool,
    },
    /// The controller reported a fatal status (CSTS.CFS).
    Fatal,
    /// The controller cannot use 4 KiB pages or the NVM command set.
    Unsupported,
    /// An admin command failed: its opcode and status (SCT << 8 | SC).
    Admin {
        /// Opcode.
        opcode: u8,
        /// Status.
        status: u16,
    },
    /// An admin command got no completion within CAP.TO.
    AdminTimeout {
        /// Opcode.
        opcode: u8,
    },
    /// The namespace's format is not one the driver serves: blocks of
    /// other than 512 bytes (the reflector's sectors: a 4 KiB format
    /// failed every request of a sector or two, a partition table's read),
    /// or metadata.
    Format,
    /// The device area given is too small for [`Layout`].
    Area,
    /// A request the driver cannot express (beyond the namespace, not a
    /// whole number of blocks, longer than the PRP list covers, a busy
    /// command id).
    Request,
}
