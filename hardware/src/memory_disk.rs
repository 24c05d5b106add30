//! A disk made of memory: the disk image itself, mapped shared as the
//! driver VM's window `disk` (the `vmdisk` driver's device). The CPU of the
//! driver VM is its DMA engine: the driver copies between the bounce slots
//! and the window. Its data lives here, in the device, so it survives every
//! restart of the driver (whose own memory is wiped), and the host makes a
//! flush durable itself (one `fdatasync` of the image per flush request),
//! whatever the driver answers.
//!
//! What it is not: a way to hide data from the driver (it maps the whole
//! disk), nor a fast path for large images (the window is the image's size,
//! at most [`MemoryDisk::MAX_SIZE`]).

use crate::shared_eventfd::SharedEventFd;
use std::fs::File;
use std::sync::Arc;

use crate::shm::SharedMemory;
use crate::{BlockHardware, FlushCount, Hardware, HardwareWindow, HostSync, InterruptRoute};

/// The disk image as device memory.
pub struct MemoryDisk {
    disk: Arc<SharedMemory>,
    /// Rung by no one: the device does nothing on its own.
    doorbell: SharedEventFd,
    interrupt: Arc<InterruptRoute>,
    /// The image synced per flush (the mapping shares its page cache).
    flushes: HostSync,
}

impl MemoryDisk {
    /// Largest image served so: the driver VM's window for the device is
    /// 256 MiB (the reflector's layout, below the doorbell page).
    pub const MAX_SIZE: u64 = 256 << 20;

    /// Maps `image` (opened for reading and writing). Its size must be a
    /// whole number of 4 KiB pages (a window's granularity) up to
    /// [`MemoryDisk::MAX_SIZE`].
    pub fn start(image: File) -> std::io::Result<MemoryDisk> {
        let size = image.metadata()?.len();
        if size == 0 || size > Self::MAX_SIZE || !size.is_multiple_of(4096) {
            return Err(std::io::Error::other(format!(
                "the image is {size} bytes; device=memory serves images of whole 4 KiB pages up to {} MiB",
                Self::MAX_SIZE >> 20
            )));
        }
        let disk = Arc::new(SharedMemory::map_file(image.try_clone()?, size as usize)?);
        let doorbell = SharedEventFd::new()?;
        Ok(MemoryDisk {
            disk,
            doorbell,
            interrupt: Arc::new(InterruptRoute::default()),
            flushes: HostSync::new(image, "the memory disk's image"),
        })
    }
}

impl Hardware for MemoryDisk {
    fn windows(&self) -> Vec<HardwareWindow> {
        vec![HardwareWindow { name: "disk", memory: self.disk.clone() }]
    }

    fn doorbell(&self) -> &SharedEventFd {
        &self.doorbell
    }

    fn interrupt(&self) -> Arc<InterruptRoute> {
        self.interrupt.clone()
    }

    /// Nothing to stop: the device has no DMA of its own, and a killed
    /// driver VM (the caller waited until it could no longer run) copies
    /// nothing more.
    fn quiesce(&self) {}

    fn resume(&self) {}
}

impl BlockHardware for MemoryDisk {
    fn capacity_sectors(&self) -> u64 {
        self.disk.size() as u64 / 512
    }

    fn read_only(&self) -> bool {
        false
    }

    fn flushes(&self) -> FlushCount {
        self.flushes.counts()
    }

    /// Syncs the image now: every write the driver completed before the
    /// flush was sent is in the shared mapping, hence in the image's page
    /// cache, and reaches the medium whatever the driver does.
    fn flush_mark(&self) -> u64 {
        self.flushes.mark()
    }
    /// The image the driver writes through the shared mapping.
    fn medium(&self) -> Option<&std::fs::File> {
        Some(self.flushes.image())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(size: u64) -> File {
        let path = std::env::temp_dir().join(format!("memory-disk-{}-{size}", std::process::id()));
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        file.set_len(size).unwrap();
        file
    }

    #[test]
    fn the_window_is_the_image_and_flushes_are_counted_by_the_host() {
        let disk = MemoryDisk::start(image(1 << 20)).unwrap();
        assert_eq!(disk.capacity_sectors(), 2048);
        let windows = disk.windows();
        assert_eq!((windows[0].name, windows[0].memory.size()), ("disk", 1 << 20));
        assert_eq!(disk.flush_mark(), 0);
        assert_eq!(disk.flushes(), FlushCount { started: 1, completed: 1, medium_failed: false });
    }

    #[test]
    fn images_it_cannot_serve_are_refused_with_the_rule() {
        for size in [0, 1000, MemoryDisk::MAX_SIZE + 4096] {
            let error = MemoryDisk::start(image(size)).err().unwrap().to_string();
            assert!(error.contains("whole 4 KiB pages"), "{size}: {error}");
        }
    }
}
