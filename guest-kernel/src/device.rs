//! A driver's view of its device: windows (mapped registers and memory),
//! doorbells (writes the host receives as eventfd signals) and interrupt
//! lines.

use core::mem::size_of;
use core::sync::atomic::AtomicU32;

use guest_abi::{DoorbellInfo, IrqInfo, Plain, WindowInfo, NAME_LEN, WINDOW_READ_ONLY};
#[cfg(driver_vm_isolated)]
use guest_abi::{DOORBELL_MMIO, DOORBELL_PORT};

use crate::arch;

/// A mapped window.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    info: WindowInfo,
    /// Where this code reaches it: its guest-physical address in a driver
    /// VM (identity mapped), the mapping's address in a hosted driver.
    base: u64,
}

impl Window {
    pub(crate) fn from_info(info: &WindowInfo, base: u64) -> Self {
        Window { info: *info, base }
    }

    /// Name given on the command line ("" if none).
    pub fn name(&self) -> &str {
        let end = self.info.name.iter().position(|&b| b == 0).unwrap_or(NAME_LEN);
        core::str::from_utf8(&self.info.name[..end]).unwrap_or("")
    }

    /// Guest physical address: what the device's DMA uses (also where this
    /// code reaches it in a driver VM, which is identity mapped).
    pub fn addr(&self) -> u64 {
        self.info.gpa
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.info.size
    }

    /// Whether writes fault.
    pub fn read_only(&self) -> bool {
        self.info.flags & WINDOW_READ_ONLY != 0
    }

    /// The window's bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the vmm (or the hosted start) maps `size` bytes at `base`
        // for the driver's lifetime.
        // Device memory may change under us; callers that care read it with
        // volatile accesses through `as_ptr`.
        unsafe { core::slice::from_raw_parts(self.base as *const u8, self.info.size as usize) }
    }

    /// The window's bytes, writable. Writing to a read-only window faults.
    #[allow(clippy::mut_from_ref)]
    pub fn as_mut_slice(&self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; the window is device memory owned by this
        // driver, which is single-threaded.
        unsafe { core::slice::from_raw_parts_mut(self.base as *mut u8, self.info.size as usize) }
    }

    /// Base pointer for volatile register access.
    pub fn as_ptr(&self) -> *mut u8 {
        self.base as *mut u8
    }

    /// The 32-bit shared word at `offset`, for fields both sides of a
    /// shared-memory protocol access. Panics if out of bounds or unaligned.
    pub fn atomic_u32(&self, offset: usize) -> &AtomicU32 {
        assert!(
            offset.is_multiple_of(4) && offset + 4 <= self.info.size as usize,
            "window offset {offset:#x} out of range"
        );
        // SAFETY: in bounds and aligned (checked above); the window stays
        // mapped for the VM's lifetime; AtomicU32 has u32's layout.
        unsafe { &*(self.as_ptr().add(offset) as *const AtomicU32) }
    }

    /// Reads a plain value at `offset` (volatile). Panics if out of bounds.
    pub fn read<T: Plain>(&self, offset: usize) -> T {
        assert!(offset + size_of::<T>() <= self.info.size as usize, "window read at {offset:#x} out of range");
        // SAFETY: in bounds (checked above); `Plain` types accept any bits.
        unsafe { (self.as_ptr().add(offset) as *const T).read_volatile() }
    }

    /// Writes a plain value at `offset` (volatile). Panics if out of bounds.
    pub fn write<T: Plain>(&self, offset: usize, value: T) {
        assert!(offset + size_of::<T>() <= self.info.size as usize, "window write at {offset:#x} out of range");
        // SAFETY: in bounds (checked above); the window is this driver's.
        unsafe { (self.as_ptr().add(offset) as *mut T).write_volatile(value) }
    }
}

/// A doorbell.
#[derive(Clone, Copy, Debug)]
pub struct Doorbell {
    info: DoorbellInfo,
}

/// A hosted doorbell: an eventfd (its number in `addr`), signalled once per
/// ring as KVM's ioeventfd would.
#[cfg(not(driver_vm_isolated))]
pub(crate) const DOORBELL_EVENTFD: u32 = 0x100;

impl Doorbell {
    #[cfg(driver_vm_isolated)]
    pub(crate) fn from_info(info: &DoorbellInfo) -> Option<Self> {
        matches!(info.kind, DOORBELL_MMIO | DOORBELL_PORT).then_some(Doorbell { info: *info })
    }

    /// A hosted doorbell on eventfd `fd`.
    #[cfg(not(driver_vm_isolated))]
    pub(crate) fn eventfd(fd: i32) -> Self {
        Doorbell { info: DoorbellInfo { kind: DOORBELL_EVENTFD, len: 8, addr: fd as u64 } }
    }

    /// Rings the doorbell with `value` (truncated to the doorbell's width).
    #[cfg(not(driver_vm_isolated))]
    pub fn ring(&self, value: u64) {
        let _ = value;
        if self.info.kind == DOORBELL_EVENTFD {
            crate::hosted::signal(self.info.addr as i32);
        }
    }

    /// Rings the doorbell with `value` (truncated to the doorbell's width).
    #[cfg(driver_vm_isolated)]
    pub fn ring(&self, value: u64) {
        let addr = self.info.addr;
        match (self.info.kind, self.info.len) {
            (DOORBELL_PORT, 1) => arch::outb(addr as u16, value as u8),
            (DOORBELL_PORT, 2) => arch::outw(addr as u16, value as u16),
            (DOORBELL_PORT, _) => arch::outl(addr as u16, value as u32),
            (DOORBELL_MMIO, len) => {
                // SAFETY: the vmm maps the doorbell's page at `addr`, aligned
                // to its width; KVM's ioeventfd catches the write.
                unsafe {
                    match len {
                        1 => (addr as *mut u8).write_volatile(value as u8),
                        2 => (addr as *mut u16).write_volatile(value as u16),
                        8 => (addr as *mut u64).write_volatile(value),
                        _ => (addr as *mut u32).write_volatile(value as u32),
                    }
                }
            }
            _ => {}
        }
    }
}

/// An interrupt line.
#[derive(Clone, Copy, Debug)]
pub struct InterruptLine {
    info: IrqInfo,
}

impl InterruptLine {
    pub(crate) fn from_info(info: &IrqInfo) -> Self {
        InterruptLine { info: *info }
    }

    /// The bit this line sets in [`arch::take_interrupts`]'s result.
    pub fn mask(&self) -> u64 {
        let bit = self.info.vector.wrapping_sub(guest_abi::IRQ_VECTOR_BASE as u32);
        if bit < 64 {
            1 << bit
        } else {
            0
        }
    }

    /// Sleeps until this line fires (returns at once if it already has),
    /// and consumes its pending bit. Other lines stay pending; while one is,
    /// this polls instead of sleeping, so a driver with several lines should
    /// use [`arch::take_interrupts`] instead.
    pub fn wait(&self) {
        let mask = self.mask();
        if mask == 0 {
            return;
        }
        while !arch::take_line(mask) {
            arch::wait_for_interrupt();
        }
    }
}
