//! Shared memory regions: a memfd mapped `MAP_SHARED` into the reflector and
//! (as a window, by path) into a driver VM. The reflector creates them and
//! holds the only mapping on the host side.
//!
//! The other side of every region is untrusted and runs concurrently, so all
//! access goes through atomics or volatile copies, with bounds checks.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use guest_abi::Plain;
use vm_memory::VolatileSlice;

/// A memfd-backed shared mapping.
pub struct SharedMemory {
    file: File,
    base: NonNull<u8>,
    size: usize,
    /// A device reaches it through an IOMMU mapping ([`SharedMemory::pin`]).
    pinned: AtomicBool,
}

// SAFETY: the mapping is plain shared memory accessed only through atomics
// and volatile copies; nothing in it is tied to a thread.
unsafe impl Send for SharedMemory {}
// SAFETY: as above.
unsafe impl Sync for SharedMemory {}

impl AsRawFd for SharedMemory {
    /// The memfd, to pass to a driver VM (see `supervisor::ChildFds`).
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}

impl SharedMemory {
    /// Creates a zeroed region of `size` bytes named `name` (for /proc).
    pub fn new(name: &str, size: usize) -> std::io::Result<Self> {
        let cname = std::ffi::CString::new(name).map_err(|_| std::io::Error::other("NUL in memfd name"))?;
        // SAFETY: memfd_create with a valid C string; returns a new fd or -1.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size as u64)?;
        // Its size is sealed for good: whoever else holds it (a driver VM's
        // vmm, a device model's QEMU; untrusted) could otherwise shrink it,
        // and the reflector's next touch of the mapping would fault
        // (SIGBUS). Punching holes (`release`) stays allowed.
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: fcntl(2) F_ADD_SEALS on the memfd just made.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Self::map_file(file, size)
    }

    /// Maps `size` bytes of an existing `file` shared (a PCI BAR's sysfs
    /// `resourceN` file: device registers, read and written only through
    /// this type's volatile and atomic accessors).
    pub fn map_file(file: File, size: usize) -> std::io::Result<Self> {
        // SAFETY: maps `size` bytes of a file we own; the kernel picks the
        // address. Checked for MAP_FAILED below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let base = NonNull::new(base as *mut u8).ok_or_else(|| std::io::Error::other("mmap returned null"))?;
        Ok(SharedMemory { file, base, size, pinned: AtomicBool::new(false) })
    }

    /// Size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Gives the pages of `offset..offset + len` back to the kernel (they
    /// read as zeros afterwards, in every mapping): memory that holds
    /// nothing anyone needs any more stops counting against the processes
    /// that touched it.
    ///
    /// Refused once the memory is [pinned](SharedMemory::pin).
    pub fn release(&self, offset: usize, len: usize) -> std::io::Result<()> {
        self.check(offset, len).ok_or_else(|| std::io::Error::other("release out of range"))?;
        if self.pinned() {
            return Err(std::io::Error::other(
                "the memory is pinned for a device's DMA (an IOMMU mapping): released pages would be new ones to \
                 the host while the device kept the old",
            ));
        }
        // SAFETY: fallocate(2) on our memfd over a checked range; punching
        // a hole keeps the size and maps stay valid (they read zeros).
        let done = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if done < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Marks the memory as reached by a device through an IOMMU mapping
    /// (VFIO), which pins the pages it maps: from now on, for good, no
    /// page is released. A released page would be replaced by a fresh one
    /// in every mapping but the IOMMU's, which keeps the old: the device
    /// would write to disk what the host never wrote, and the host read
    /// zeros where the device put data.
    pub fn pin(&self) {
        self.pinned.store(true, Ordering::Release);
    }

    /// Whether a device reaches it through an IOMMU mapping.
    pub fn pinned(&self) -> bool {
        self.pinned.load(Ordering::Acquire)
    }

    fn check(&self, offset: usize, len: usize) -> Option<()> {
        (offset.checked_add(len)? <= self.size).then_some(())
    }

    /// The shared 32-bit word at `offset`. Panics if out of bounds or
    /// unaligned: offsets come from the layout constants, never from input.
    pub fn atomic_u32(&self, offset: usize) -> &AtomicU32 {
        assert!(offset.is_multiple_of(4) && self.check(offset, 4).is_some(), "shared word {offset:#x} out of range");
        // SAFETY: in bounds and 4-aligned (the mapping is page aligned);
        // AtomicU32 has the layout of u32; the mapping lives as long as self.
        unsafe { &*(self.base.as_ptr().add(offset) as *const AtomicU32) }
    }

    /// Reads a plain value at `offset` (a volatile copy); None if out of bounds.
    pub fn read<T: Plain>(&self, offset: usize) -> Option<T> {
        self.check(offset, size_of::<T>())?;
        // SAFETY: in bounds (checked); `Plain` accepts any bits; unaligned read.
        Some(unsafe { std::ptr::read_volatile(self.base.as_ptr().add(offset) as *const T) })
    }

    /// Writes a plain value at `offset` (volatile); false if out of bounds.
    pub fn write<T: Plain>(&self, offset: usize, value: T) -> bool {
        if self.check(offset, size_of::<T>()).is_none() {
            return false;
        }
        // SAFETY: in bounds (checked); the mapping is writable.
        unsafe { std::ptr::write_volatile(self.base.as_ptr().add(offset) as *mut T, value) };
        true
    }

    /// `[offset, offset + len)` as a volatile slice; None if out of bounds.
    pub fn slice(&self, offset: usize, len: usize) -> Option<VolatileSlice<'_>> {
        self.check(offset, len)?;
        // SAFETY: in bounds (checked) of a mapping that lives as long as the
        // returned borrow; volatile slices tolerate concurrent access.
        Some(unsafe { VolatileSlice::new(self.base.as_ptr().add(offset), len) })
    }

    /// Fills `[offset, offset + len)` from `file` at `file_offset` (pread).
    pub fn read_from_file(&self, file: &File, file_offset: u64, offset: usize, len: usize) -> std::io::Result<()> {
        self.check(offset, len).ok_or_else(|| std::io::Error::other("range outside the shared region"))?;
        let mut done = 0;
        while done < len {
            // SAFETY: the destination range is inside the mapping (checked).
            let n = unsafe {
                libc::pread(
                    file.as_raw_fd(),
                    self.base.as_ptr().add(offset + done) as *mut libc::c_void,
                    len - done,
                    (file_offset + done as u64) as libc::off_t,
                )
            };
            match n {
                n if n > 0 => done += n as usize,
                0 => {
                    // The file ends inside a range the device said it has:
                    // it shrank under us. Zeros would be silent data loss.
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("the file ends at {} bytes: it shrank", file_offset + done as u64),
                    ));
                }
                _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
                _ => return Err(std::io::Error::last_os_error()),
            }
        }
        Ok(())
    }

    /// Writes `[offset, offset + len)` to `file` at `file_offset` (pwrite).
    pub fn write_to_file(&self, file: &File, file_offset: u64, offset: usize, len: usize) -> std::io::Result<()> {
        self.check(offset, len).ok_or_else(|| std::io::Error::other("range outside the shared region"))?;
        let mut done = 0;
        while done < len {
            // SAFETY: the source range is inside the mapping (checked).
            let n = unsafe {
                libc::pwrite(
                    file.as_raw_fd(),
                    self.base.as_ptr().add(offset + done) as *const libc::c_void,
                    len - done,
                    (file_offset + done as u64) as libc::off_t,
                )
            };
            match n {
                n if n > 0 => done += n as usize,
                _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
                _ => return Err(std::io::Error::last_os_error()),
            }
        }
        Ok(())
    }
}

impl Drop for SharedMemory {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`; no references
        // into it outlive `self` (they all borrow it).
        unsafe { libc::munmap(self.base.as_ptr() as *mut libc::c_void, self.size) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    /// Nobody holding the memfd (a driver VM's vmm, QEMU) can change its
    /// size: a shrunk file would make the reflector's next touch fault.
    #[test]
    fn no_holder_can_change_the_size_of_a_region() {
        use std::os::unix::fs::FileExt;
        let region = SharedMemory::new("sealed", 8192).unwrap();
        // What another process would get: the same open file.
        let file = region.file.try_clone().unwrap();
        for size in [0, 4096, 16384] {
            let error = file.set_len(size).unwrap_err();
            assert_eq!(error.raw_os_error(), Some(libc::EPERM), "set_len({size})");
        }
        let grown = file.write_at(&[1], 8192).unwrap_err();
        assert_eq!(grown.raw_os_error(), Some(libc::EPERM), "a write past the end");
        // SAFETY: fallocate(2) and fcntl(2) on a descriptor this test holds.
        let (allocated, resealed) = unsafe {
            (libc::fallocate(file.as_raw_fd(), 0, 0, 16384), libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, 0))
        };
        assert_eq!((allocated, resealed), (-1, -1), "fallocate growing it, or a change of its seals");
        assert_eq!(file.metadata().unwrap().len(), 8192);
        // Its own pages are still released (a punched hole keeps the size).
        region.write(0, 7u32);
        region.release(0, 4096).unwrap();
        assert_eq!(region.read::<u32>(0), Some(0));
    }

    #[test]
    fn accessors_check_bounds() {
        let shm = SharedMemory::new("test", 8192).unwrap();
        shm.atomic_u32(4096).store(7, Ordering::SeqCst);
        assert_eq!(shm.read::<u32>(4096), Some(7));
        assert!(shm.write::<u64>(8184, 1));
        assert!(!shm.write::<u64>(8188, 1));
        assert_eq!(shm.read::<u64>(8190), None);
        assert!(shm.slice(8000, 193).is_none());
        assert!(shm.slice(usize::MAX, 2).is_none());
        let reopened = std::fs::read(format!("/proc/self/fd/{}", shm.as_raw_fd())).unwrap();
        assert_eq!(reopened.len(), 8192);
        assert_eq!(reopened[4096], 7);
    }

    #[test]
    fn released_pages_read_as_zeros_and_stop_being_resident() {
        let shm = SharedMemory::new("test", 64 * 4096).unwrap();
        for page in 0..64 {
            shm.write::<u64>(page * 4096, 0x5a);
        }
        let resident = || {
            let mut pages = vec![0u8; 64];
            // SAFETY: mincore(2) over our own page-aligned mapping, one byte per page.
            assert_eq!(unsafe { libc::mincore(shm.base.as_ptr().cast(), 64 * 4096, pages.as_mut_ptr()) }, 0);
            pages.iter().filter(|p| **p & 1 == 1).count()
        };
        assert_eq!(resident(), 64);
        shm.release(4096, 62 * 4096).unwrap();
        assert_eq!(resident(), 2, "the released pages are still resident");
        assert_eq!(
            (shm.read::<u64>(0), shm.read::<u64>(4096), shm.read::<u64>(63 * 4096)),
            (Some(0x5a), Some(0), Some(0x5a))
        );
        assert!(shm.release(60 * 4096, 8 * 4096).is_err(), "a range past the end was released");
    }

    /// Memory an IOMMU maps keeps its pages: the device would go on using
    /// the old ones after a release.
    #[test]
    fn pinned_memory_is_never_released() {
        let shm = SharedMemory::new("test", 4 * 4096).unwrap();
        shm.write::<u64>(4096, 0x5a);
        shm.pin();
        assert!(shm.release(0, 4 * 4096).is_err(), "pinned memory was released");
        assert_eq!(shm.read::<u64>(4096), Some(0x5a));
    }

    #[test]
    fn file_transfers_round_trip() {
        let shm = SharedMemory::new("test", 8192).unwrap();
        let path = std::env::temp_dir().join(format!("reflector-shm-test-{}", std::process::id()));
        let file = File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        shm.slice(0, 4096).unwrap().copy_from(&[0xa5u8; 4096]);
        shm.write_to_file(&file, 512, 0, 4096).unwrap();
        shm.read_from_file(&file, 512, 4096, 4096).unwrap();
        assert_eq!(shm.read::<u64>(4096 + 4088), Some(0xa5a5_a5a5_a5a5_a5a5));
        // Reading past the end of the file is an error (it shrank), not zeros.
        assert!(shm.read_from_file(&file, 1 << 20, 0, 512).is_err());
        assert!(shm.read_from_file(&file, 0, 8000, 512).is_err());
    }
}
