//! Guest physical memory: anonymous RAM at 0 plus one shared file mapping per
//! window, all in one vm-memory collection.
//!
//! RAM is an anonymous private mapping, so pages cost nothing until touched.
//! Windows are `MAP_SHARED`, so guest writes reach the file (a device BAR, a
//! memfd shared with a supervisor, a regular file).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap};

use crate::config::{VmConfig, WindowConfig};
use crate::error::{Error, Result};

/// One KVM memory slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    /// Guest physical address.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// Host virtual address of the mapping.
    pub host_addr: u64,
    /// Guest writes are refused (KVM_MEM_READONLY).
    pub read_only: bool,
}

/// Guest memory and the slots to register with KVM.
pub struct GuestMemory {
    /// RAM and windows.
    pub memory: GuestMemoryMmap,
    /// One per region, RAM first.
    pub slots: Vec<Slot>,
}

/// Maps RAM and every window of `config`.
pub fn build(config: &VmConfig) -> Result<GuestMemory> {
    let ram = GuestRegionMmap::from_range(GuestAddress(0), config.memory as usize, None).map_err(|e| Error::Io {
        operation: format!("allocating {} bytes of guest RAM", config.memory),
        source: std::io::Error::other(e),
    })?;
    let mut regions = vec![(ram, false)];
    let mut windows: Vec<&WindowConfig> = config.windows.iter().collect();
    windows.sort_by_key(|w| w.gpa);
    for window in windows {
        regions.push((map_window(window)?, window.read_only));
    }
    let slots = regions
        .iter()
        .map(|(region, read_only)| Slot {
            gpa: region.start_addr().0,
            size: region.len(),
            host_addr: region.as_ptr() as u64,
            read_only: *read_only,
        })
        .collect();
    let memory = GuestMemoryMmap::from_regions(regions.into_iter().map(|(region, _)| region).collect())
        .map_err(|e| Error::invalid("guest memory layout", e.to_string()))?;
    Ok(GuestMemory { memory, slots })
}

/// A private duplicate of inherited descriptor `fd` (the vmm may be given
/// the same one for several windows).
fn inherited_file(fd: std::os::fd::RawFd) -> std::io::Result<File> {
    use std::os::fd::FromRawFd;
    // SAFETY: F_DUPFD_CLOEXEC on a number; fails with EBADF if not open.
    let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if copy < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor this process owns.
    Ok(unsafe { File::from_raw_fd(copy) })
}

fn window_error(window: &WindowConfig, reason: impl Into<String>) -> Error {
    Error::WindowFile { path: window.path.clone(), reason: reason.into() }
}

/// Opens (or duplicates) the file behind `window`, checked to be one a
/// window can map.
pub fn open_window_file(window: &WindowConfig) -> Result<File> {
    let opened = match window.fd {
        Some(fd) => inherited_file(fd),
        // Non-blocking: opening a FIFO for reading waits for a writer for
        // ever (it is then refused as a file no window can map).
        None => {
            OpenOptions::new().read(true).write(!window.read_only).custom_flags(libc::O_NONBLOCK).open(&window.path)
        }
    };
    let file = opened.map_err(|e| {
        window_error(
            window,
            format!(
                "cannot open it {}: {e}",
                if window.read_only {
                    "for reading"
                } else {
                    "for reading and writing (add ,ro for a read-only window)"
                }
            ),
        )
    })?;
    let metadata = file.metadata().map_err(|e| window_error(window, format!("cannot stat it: {e}")))?;
    let kind = metadata.file_type();
    let needed = window.offset.saturating_add(window.size);
    if kind.is_file() {
        // Mapping past the end of a file would SIGBUS the vmm when the guest
        // touches it.
        if metadata.len() < needed {
            return Err(window_error(
                window,
                format!(
                    "it is {} bytes but the window needs offset {:#x} + size {:#x} = {needed} bytes",
                    metadata.len(),
                    window.offset,
                    window.size
                ),
            ));
        }
    } else if !kind.is_char_device() && !kind.is_block_device() {
        return Err(window_error(window, "not a regular file or device"));
    }
    Ok(file)
}

fn map_window(window: &WindowConfig) -> Result<GuestRegionMmap> {
    let file = open_window_file(window)?;
    let prot = if window.read_only { libc::PROT_READ } else { libc::PROT_READ | libc::PROT_WRITE };
    let region = MmapRegionBuilder::new(window.size as usize)
        .with_file_offset(FileOffset::new(file, window.offset))
        .with_mmap_prot(prot)
        .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
        .build()
        .map_err(|e| window_error(window, format!("cannot map it: {e}")))?;
    GuestRegionMmap::new(region, GuestAddress(window.gpa))
        .ok_or_else(|| window_error(window, "the window wraps around the address space"))
}
