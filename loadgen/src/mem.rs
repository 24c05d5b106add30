//! The "guest memory" we share with the backend: one memfd, mapped once, at a fixed guest
//! physical base address.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use crate::error::{Error, Result};

/// Guest physical address at which the shared region starts. Not zero, so that a backend that
/// confuses guest physical addresses with offsets fails loudly instead of working by accident.
pub const GPA_BASE: u64 = 0x4000_0000;

/// One shared memory region: a memfd mapped `MAP_SHARED` into this process.
pub struct GuestMem {
    file: File,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this struct; moving it to another thread is fine.
unsafe impl Send for GuestMem {}

impl GuestMem {
    /// Creates and maps a memfd of `len` bytes (rounded up to a page).
    pub fn new(len: usize) -> Result<Self> {
        let len = len.div_ceil(4096) * 4096;
        if len == 0 {
            return Err(Error::InvalidJob("guest memory size is zero".into()));
        }
        let name = c"blk-load-guest-mem";
        // SAFETY: `name` is a valid NUL-terminated string; the call has no other preconditions.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::last_os("memfd_create"));
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64).map_err(|e| Error::sys("sizing the guest memory memfd", e))?;
        // SAFETY: mapping a fresh shared region backed by our own memfd of `len` bytes; the kernel
        // picks the address so nothing existing is overwritten.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::last_os("mmap of the guest memory"));
        }
        Ok(GuestMem { file, ptr: ptr.cast(), len })
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if the region is empty (never, by construction).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The memfd backing the region.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Host virtual address of the start of the mapping.
    pub fn host_base(&self) -> *mut u8 {
        self.ptr
    }

    /// Guest physical address of byte `off` of the region.
    pub fn gpa(&self, off: usize) -> u64 {
        debug_assert!(off <= self.len);
        GPA_BASE + off as u64
    }

    /// Host address of byte `off` as seen by the backend in `SET_VRING_ADDR` (the frontend's
    /// virtual address, like QEMU sends).
    pub fn uaddr(&self, off: usize) -> u64 {
        debug_assert!(off <= self.len);
        self.ptr as u64 + off as u64
    }

    /// The bytes `off..off + len` as a shared slice.
    ///
    /// The backend may write into the region concurrently, but only into buffers we handed it
    /// and have not yet got back; callers only look at buffers they own.
    pub fn slice(&self, off: usize, len: usize) -> &[u8] {
        assert!(off.checked_add(len).is_some_and(|end| end <= self.len), "guest memory range out of bounds");
        // SAFETY: in bounds of our live mapping (checked above).
        unsafe { std::slice::from_raw_parts(self.ptr.add(off), len) }
    }

    /// The bytes `off..off + len` as a mutable slice (same ownership rule as [`GuestMem::slice`]).
    pub fn slice_mut(&mut self, off: usize, len: usize) -> &mut [u8] {
        assert!(off.checked_add(len).is_some_and(|end| end <= self.len), "guest memory range out of bounds");
        // SAFETY: in bounds of our live mapping (checked above); `&mut self` gives exclusivity
        // on our side.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(off), len) }
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping this struct created; no references outlive self.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_and_touch() {
        let mut m = GuestMem::new(10_000).unwrap();
        assert_eq!(m.len(), 12_288);
        m.slice_mut(4096, 4).copy_from_slice(&[1, 2, 3, 4]);
        assert_eq!(m.slice(4096, 4), &[1, 2, 3, 4]);
        assert_eq!(m.gpa(4096), GPA_BASE + 4096);
        assert_eq!(m.file().metadata().unwrap().len(), 12_288);
    }
}
