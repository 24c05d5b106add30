//! Per-request DMA windows: an IOMMU with strict semantics for a device that
//! runs in the reflector (`dma=direct`).
//!
//! In the default bounce mode a device reaches only the channel's bounce
//! slots, and the reflector copies each payload between a slot and the
//! client's memory. Here the reflector instead maps, for each request it
//! sends, a window onto that request's own client buffers at the address of
//! its bounce slot, and revokes it before the request completes (or when the
//! driver VM that held it dies). The device's DMA for a slot address goes to
//! the window mapped there, and nowhere else:
//! - no window mapped: the access faults (nothing falls back to the slot's
//!   memory, so a driver cannot read a payload into memory it maps);
//! - only in the window's direction: a write request's buffers are
//!   device-readable (a driver cannot make the device overwrite what the
//!   client asked to have written), a read request's device-writable (a
//!   driver cannot make the device read what stale memory the client's
//!   read buffers hold);
//! - only inside the window: an access that runs past it faults whole;
//! - [`DmaWindows::unmap`] waits for the one access in progress on the
//!   window (none starts while it waits), so after it returns the device
//!   cannot touch those buffers again.
//!
//! The driver VM never maps client memory either way: it only names slot
//! addresses. What it can still do is what it could do with bounce slots
//! (aim one in-flight request's data at another's buffers, at any sector):
//! DESIGN.md and the threat model weigh the trade-off.
//!
//! This module never chooses what memory a window covers (the reflector's
//! `blk::marshal` does, from a checked request), and it reaches client
//! memory only through the kernel (`preadv`/`pwritev`), which reports a
//! page that vanished (a client truncating its memory) as an error rather
//! than a signal.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

/// What the device may do with a window's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceAccess {
    /// Read it (a write request's payload, going to the medium).
    Read,
    /// Write it (a read request's buffers, filled from the medium).
    Write,
}

/// Why a DMA access through the windows was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DmaFault {
    /// The address is not in any window's range.
    #[error("DMA address {0:#x} is outside the windowed range")]
    Outside(u64),
    /// No window is mapped there (none was, or it was revoked).
    #[error("no DMA window is mapped at {0:#x}")]
    NotMapped(u64),
    /// The window does not allow this direction.
    #[error("the DMA window at {address:#x} allows only {allowed:?}")]
    Direction {
        /// The address.
        address: u64,
        /// What the window allows.
        allowed: DeviceAccess,
    },
    /// The access runs past the end of the window.
    #[error("DMA of {len} bytes at {address:#x} runs past its window")]
    PastEnd {
        /// The address.
        address: u64,
        /// The access's length.
        len: u32,
    },
    /// The client's memory no longer covers a buffer of the window.
    #[error("a buffer of the DMA window at {0:#x} is no longer in client memory")]
    Gone(u64),
}

/// Why a window could not be made.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    /// A buffer is not inside the memory it is said to be in.
    #[error("buffer [{addr:#x}, +{len}) is outside client memory")]
    OutsideMemory {
        /// Its address.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// The buffers add up to more than a window holds.
    #[error("buffers of {0} bytes do not fit a window of {1}")]
    TooLarge(u64, u32),
}

/// One request's buffers, in order, as one device-contiguous range.
pub struct Window {
    /// Keeps the client's memory mapped while the window exists, even if the
    /// client sends a new memory table meanwhile.
    memory: Arc<GuestMemoryMmap>,
    /// Kept as long as the mapping: what makes a fault in it survivable
    /// (the reflector's SIGBUS registration of the table), so that a
    /// client that shrinks a table it has replaced cannot fault the
    /// device's access through a window still open on it.
    _guard: Option<Arc<dyn std::any::Any + Send + Sync>>,
    buffers: Vec<(GuestAddress, u32)>,
    len: u32,
    access: DeviceAccess,
}

impl Window {
    /// A window onto `buffers` (client address, length) of `memory`; each
    /// must lie inside it, and all together within `limit` bytes. `guard`
    /// lives as long as the window.
    pub fn new(
        memory: Arc<GuestMemoryMmap>,
        guard: Option<Arc<dyn std::any::Any + Send + Sync>>,
        buffers: Vec<(GuestAddress, u32)>,
        access: DeviceAccess,
        limit: u32,
    ) -> Result<Window, WindowError> {
        let mut len = 0u64;
        for &(addr, size) in &buffers {
            if memory.get_slice(addr, size as usize).is_err() {
                return Err(WindowError::OutsideMemory { addr: addr.0, len: size });
            }
            len += u64::from(size);
        }
        if len > u64::from(limit) {
            return Err(WindowError::TooLarge(len, limit));
        }
        Ok(Window { memory, _guard: guard, buffers, len: len as u32, access })
    }

    /// Its length.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Whether it covers nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// What the device may do with it.
    pub fn access(&self) -> DeviceAccess {
        self.access
    }

    /// The pieces of client memory that `[offset, offset + len)` of the
    /// window covers (inside the window: checked by the caller).
    fn slices(&self, mut offset: u32, mut len: u32) -> Option<Vec<VolatileSlice<'_>>> {
        let mut slices = Vec::with_capacity(self.buffers.len());
        for &(addr, size) in &self.buffers {
            if len == 0 {
                break;
            }
            if offset >= size {
                offset -= size;
                continue;
            }
            let take = (size - offset).min(len);
            slices.push(self.memory.get_slice(GuestAddress(addr.0 + u64::from(offset)), take as usize).ok()?);
            len -= take;
            offset = 0;
        }
        (len == 0).then_some(slices)
    }
}

/// One window's place in the table.
#[derive(Default)]
struct Slot {
    /// Held by the device for the length of an access, so that `unmap`
    /// waits for it.
    window: Mutex<Option<Window>>,
    /// Set while `unmap` waits: the device starts no new access meanwhile,
    /// so a driver keeping the device busy on one window cannot starve its
    /// revocation (the lock is not fair); `unmap` waits for at most the one
    /// access in progress.
    revoking: AtomicBool,
}

/// The windows of one device: `count` of `granule` bytes from device
/// address `base` (the bounce slots' addresses), each empty or mapped.
pub struct DmaWindows {
    base: u64,
    granule: u32,
    slots: Vec<Slot>,
}

impl DmaWindows {
    /// The device address of the first window.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// `count` empty windows of `granule` (at least one) bytes from `base`.
    pub fn new(base: u64, granule: u32, count: u32) -> Arc<DmaWindows> {
        Arc::new(DmaWindows { base, granule: granule.max(1), slots: (0..count).map(|_| Slot::default()).collect() })
    }

    /// The most one window can hold.
    pub fn granule(&self) -> u32 {
        self.granule
    }

    fn lock(&self, index: u32) -> Option<MutexGuard<'_, Option<Window>>> {
        let slot = self.slots.get(index as usize)?;
        Some(slot.window.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    /// Maps `window` at window `index` (replacing what was there); false if
    /// there is no such index.
    pub fn map(&self, index: u32, window: Window) -> bool {
        match self.lock(index) {
            Some(mut slot) => {
                *slot = Some(window);
                true
            }
            None => false,
        }
    }

    /// Revokes window `index`, after the access in progress on it (if any)
    /// ends; no new access starts meanwhile.
    pub fn unmap(&self, index: u32) {
        let Some(slot) = self.slots.get(index as usize) else { return };
        slot.revoking.store(true, Ordering::SeqCst);
        *slot.window.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
        slot.revoking.store(false, Ordering::SeqCst);
    }

    /// Revokes every window.
    pub fn unmap_all(&self) {
        for index in 0..self.slots.len() as u32 {
            self.unmap(index);
        }
    }

    /// Whether window `index` is mapped.
    pub fn is_mapped(&self, index: u32) -> bool {
        self.lock(index).is_some_and(|slot| slot.is_some())
    }

    /// How many windows are mapped.
    pub fn mapped(&self) -> usize {
        (0..self.slots.len() as u32).filter(|index| self.is_mapped(*index)).count()
    }

    /// Runs `access` on the client memory behind `[address, address + len)`
    /// if one window allows `direction` there, holding the window so that it
    /// cannot be revoked meanwhile.
    pub fn with<T>(
        &self,
        address: u64,
        len: u32,
        direction: DeviceAccess,
        access: impl FnOnce(&[VolatileSlice]) -> T,
    ) -> Result<T, DmaFault> {
        let relative = address.checked_sub(self.base).ok_or(DmaFault::Outside(address))?;
        let index = u32::try_from(relative / u64::from(self.granule)).map_err(|_| DmaFault::Outside(address))?;
        let offset = (relative % u64::from(self.granule)) as u32;
        let place = self.slots.get(index as usize).ok_or(DmaFault::Outside(address))?;
        // Checked before and after taking the lock: a revocation under way
        // wins over any access not yet started.
        if place.revoking.load(Ordering::SeqCst) {
            return Err(DmaFault::NotMapped(address));
        }
        let slot = place.window.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if place.revoking.load(Ordering::SeqCst) {
            return Err(DmaFault::NotMapped(address));
        }
        let window = slot.as_ref().ok_or(DmaFault::NotMapped(address))?;
        if window.access != direction {
            return Err(DmaFault::Direction { address, allowed: window.access });
        }
        if len == 0 || offset.checked_add(len).is_none_or(|end| end > window.len) {
            return Err(DmaFault::PastEnd { address, len });
        }
        let slices = window.slices(offset, len).ok_or(DmaFault::Gone(address))?;
        Ok(access(&slices))
    }
}

/// Fills `slices` from `file` at `offset` (preadv: one call for a whole
/// scattered request).
pub fn read_file_into(file: &File, offset: u64, slices: &[VolatileSlice]) -> std::io::Result<()> {
    transfer(file, offset, slices, Direction::FromFile)
}

/// Writes `slices` to `file` at `offset` (pwritev).
pub fn write_file_from(file: &File, offset: u64, slices: &[VolatileSlice]) -> std::io::Result<()> {
    transfer(file, offset, slices, Direction::ToFile)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    FromFile,
    ToFile,
}

fn transfer(file: &File, offset: u64, slices: &[VolatileSlice], direction: Direction) -> std::io::Result<()> {
    let mut iovecs: Vec<libc::iovec> = slices
        .iter()
        .map(|slice| libc::iovec { iov_base: slice.ptr_guard_mut().as_ptr().cast(), iov_len: slice.len() })
        .collect();
    let total: usize = slices.iter().map(|slice| slice.len()).sum();
    let (mut done, mut first) = (0usize, 0usize);
    while done < total {
        let pending = &iovecs[first..];
        let count = pending.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        let at = (offset + done as u64) as libc::off_t;
        // SAFETY: every iovec covers a slice of mapped client memory that
        // the caller's window keeps mapped for the length of this call; the
        // kernel checks the pages itself and reports a missing one as EFAULT.
        let n = unsafe {
            match direction {
                Direction::FromFile => libc::preadv(file.as_raw_fd(), pending.as_ptr(), count, at),
                Direction::ToFile => libc::pwritev(file.as_raw_fd(), pending.as_ptr(), count, at),
            }
        };
        match n {
            n if n > 0 => {
                let mut advanced = n as usize;
                done += advanced;
                while first < iovecs.len() && advanced >= iovecs[first].iov_len {
                    advanced -= iovecs[first].iov_len;
                    first += 1;
                }
                if advanced > 0 {
                    let iovec = &mut iovecs[first];
                    // SAFETY: `advanced` is less than this iovec's length.
                    iovec.iov_base = unsafe { iovec.iov_base.cast::<u8>().add(advanced) }.cast();
                    iovec.iov_len -= advanced;
                }
            }
            0 if direction == Direction::FromFile => {
                // The file ends inside a range the device said it has: it
                // shrank under us. Zeros would be silent data loss.
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("the file ends at {} bytes: it shrank", offset + done as u64),
                ));
            }
            0 => return Err(std::io::Error::new(std::io::ErrorKind::WriteZero, "the medium took no bytes")),
            _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            _ => return Err(std::io::Error::last_os_error()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek, Write};

    use vm_memory::Bytes;

    use super::*;

    const BASE: u64 = 0x1000_0000;
    const GRANULE: u32 = 64 * 1024;

    fn memory() -> Arc<GuestMemoryMmap> {
        Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap())
    }

    fn medium(bytes: &[u8]) -> File {
        let mut file = tempfile();
        file.write_all(bytes).unwrap();
        file.rewind().unwrap();
        file
    }

    fn tempfile() -> File {
        // SAFETY: memfd_create with a NUL-terminated name; the descriptor
        // is owned by the File from here on.
        let fd = unsafe { libc::memfd_create(c"dma-windows-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a descriptor just created and owned by nothing else.
        unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) }
    }

    #[test]
    fn a_scattered_read_lands_in_the_requests_buffers_only() {
        let memory = memory();
        let windows = DmaWindows::new(BASE, GRANULE, 4);
        let buffers = vec![(GuestAddress(0x3000), 512), (GuestAddress(0x9000), 1024)];
        assert!(windows.map(2, Window::new(memory.clone(), None, buffers, DeviceAccess::Write, GRANULE).unwrap()));
        let source: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let file = medium(&source);
        let at = BASE + 2 * u64::from(GRANULE);
        windows.with(at, 1536, DeviceAccess::Write, |slices| read_file_into(&file, 512, slices)).unwrap().unwrap();
        let mut first = vec![0u8; 512];
        let mut second = vec![0u8; 1024];
        memory.read_slice(&mut first, GuestAddress(0x3000)).unwrap();
        memory.read_slice(&mut second, GuestAddress(0x9000)).unwrap();
        assert_eq!(first, source[512..1024]);
        assert_eq!(second, source[1024..2048]);
        let mut around = [0u8; 16];
        memory.read_slice(&mut around, GuestAddress(0x3200)).unwrap();
        assert_eq!(around, [0u8; 16], "bytes past the first buffer stay untouched");
        // Part of a window, from inside its second buffer.
        windows.with(at + 1024, 512, DeviceAccess::Write, |slices| read_file_into(&file, 0, slices)).unwrap().unwrap();
        memory.read_slice(&mut second, GuestAddress(0x9000)).unwrap();
        assert_eq!(second[512..], source[..512]);
    }

    #[test]
    fn a_write_reads_the_buffers_in_order() {
        let memory = memory();
        memory.write_slice(&[1u8; 512], GuestAddress(0x5000)).unwrap();
        memory.write_slice(&[2u8; 512], GuestAddress(0x1000)).unwrap();
        let windows = DmaWindows::new(BASE, GRANULE, 4);
        let buffers = vec![(GuestAddress(0x5000), 512), (GuestAddress(0x1000), 512)];
        windows.map(0, Window::new(memory, None, buffers, DeviceAccess::Read, GRANULE).unwrap());
        let mut file = medium(&[0u8; 2048]);
        windows.with(BASE, 1024, DeviceAccess::Read, |slices| write_file_from(&file, 1024, slices)).unwrap().unwrap();
        let mut written = Vec::new();
        file.read_to_end(&mut written).unwrap();
        assert_eq!(&written[1024..1536], &[1u8; 512]);
        assert_eq!(&written[1536..], &[2u8; 512]);
    }

    #[test]
    fn accesses_outside_a_mapped_window_its_direction_or_its_length_fault() {
        let memory = memory();
        let windows = DmaWindows::new(BASE, GRANULE, 4);
        let one =
            |access| Window::new(memory.clone(), None, vec![(GuestAddress(0x4000), 4096)], access, GRANULE).unwrap();
        windows.map(1, one(DeviceAccess::Read));
        let at = BASE + u64::from(GRANULE);
        let touch = |address, len, direction| windows.with(address, len, direction, |_| ());
        assert_eq!(touch(at, 4096, DeviceAccess::Read), Ok(()));
        assert_eq!(
            touch(at, 4096, DeviceAccess::Write),
            Err(DmaFault::Direction { address: at, allowed: DeviceAccess::Read })
        );
        assert_eq!(touch(at + 512, 4096, DeviceAccess::Read), Err(DmaFault::PastEnd { address: at + 512, len: 4096 }));
        assert_eq!(touch(at, 0, DeviceAccess::Read), Err(DmaFault::PastEnd { address: at, len: 0 }));
        assert_eq!(touch(BASE, 512, DeviceAccess::Read), Err(DmaFault::NotMapped(BASE)));
        assert_eq!(touch(BASE - 1, 512, DeviceAccess::Read), Err(DmaFault::Outside(BASE - 1)));
        let beyond = BASE + 4 * u64::from(GRANULE);
        assert_eq!(touch(beyond, 512, DeviceAccess::Read), Err(DmaFault::Outside(beyond)));
        assert_eq!(touch(u64::MAX, 512, DeviceAccess::Read), Err(DmaFault::Outside(u64::MAX)));
        assert_eq!(windows.mapped(), 1);
        windows.unmap(1);
        assert_eq!(touch(at, 4096, DeviceAccess::Read), Err(DmaFault::NotMapped(at)));
        assert!(!windows.map(4, one(DeviceAccess::Read)), "there is no window 4");
        windows.map(0, one(DeviceAccess::Write));
        windows.map(3, one(DeviceAccess::Write));
        windows.unmap_all();
        assert_eq!(windows.mapped(), 0);
    }

    #[test]
    fn a_window_must_lie_in_client_memory_and_fit() {
        let memory = memory();
        let outside =
            Window::new(memory.clone(), None, vec![(GuestAddress((1 << 20) - 256), 512)], DeviceAccess::Read, GRANULE);
        assert_eq!(outside.err(), Some(WindowError::OutsideMemory { addr: (1 << 20) - 256, len: 512 }));
        let large = Window::new(memory, None, vec![(GuestAddress(0), 4096); 17], DeviceAccess::Read, GRANULE);
        assert_eq!(large.err(), Some(WindowError::TooLarge(17 * 4096, GRANULE)));
    }

    #[test]
    fn unmapping_waits_for_an_access_in_progress() {
        let memory = memory();
        let windows = DmaWindows::new(BASE, GRANULE, 1);
        windows.map(0, Window::new(memory, None, vec![(GuestAddress(0), 4096)], DeviceAccess::Write, GRANULE).unwrap());
        let (entered, release) = (std::sync::mpsc::channel(), std::sync::mpsc::channel::<()>());
        let device = {
            let windows = windows.clone();
            let (entered, release) = (entered.0, release.1);
            std::thread::spawn(move || {
                windows
                    .with(BASE, 4096, DeviceAccess::Write, |_| {
                        entered.send(()).unwrap();
                        release.recv().unwrap();
                    })
                    .unwrap();
            })
        };
        entered.1.recv().unwrap();
        let unmapped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let revoker = {
            let (windows, unmapped) = (windows.clone(), unmapped.clone());
            std::thread::spawn(move || {
                windows.unmap(0);
                unmapped.store(true, std::sync::atomic::Ordering::SeqCst);
            })
        };
        // Once the revoker waits (its flag is up), the access in progress
        // still holds the window, and no new access may start: a busy
        // device cannot starve the revocation.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !windows.slots[0].revoking.load(Ordering::SeqCst) {
            assert!(std::time::Instant::now() < deadline, "the revoker never started");
            std::thread::yield_now();
        }
        assert!(!unmapped.load(Ordering::SeqCst), "the revocation finished under an access");
        assert_eq!(windows.with(BASE, 4096, DeviceAccess::Write, |_| ()), Err(DmaFault::NotMapped(BASE)));
        release.0.send(()).unwrap();
        device.join().unwrap();
        revoker.join().unwrap();
        assert!(unmapped.load(std::sync::atomic::Ordering::SeqCst));
        assert!(!windows.is_mapped(0));
    }
}
