//! QEMU's NVMe controller as the block hardware of a device: the model in
//! its QEMU process, reached by the driver VM through a trapped BAR0
//! window (`proxy`), DMA into the channel's bounce slots and device area.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::{Model, ModelError, QemuModel};
use crate::shm::SharedMemory;
use crate::{BlockHardware, FlushCount, Hardware, HardwareWindow, InterruptRoute, TrapWindow};

/// An NVMe controller (QEMU's model) on a raw image.
pub struct QemuNvme {
    model: Arc<QemuModel>,
    interrupt: Arc<InterruptRoute>,
    /// NVMe doorbells are in BAR0: nothing rings this one.
    doorbell: EventFd,
    image: File,
    capacity_sectors: u64,
    read_only: bool,
    flushes: Mutex<FlushCount>,
}

impl QemuNvme {
    /// Starts QEMU (`qemu`) with an NVMe controller on `image`, able to
    /// reach `len` bytes of `dma` from `offset`.
    pub fn start(
        qemu: &Path,
        name: &str,
        image: &Path,
        read_only: bool,
        dma: &SharedMemory,
        offset: usize,
        len: usize,
    ) -> Result<QemuNvme, ModelError> {
        let file = File::options().read(true).write(!read_only).open(image)?;
        let capacity_sectors = file.metadata()?.len() / 512;
        let interrupt = Arc::new(InterruptRoute::default());
        let model = Model::Nvme { image: image.to_owned(), read_only };
        let serial: String = name.chars().filter(char::is_ascii_alphanumeric).take(20).collect();
        let model = QemuModel::start(qemu, model, &serial, dma, offset, len, interrupt.clone())?;
        Ok(QemuNvme {
            model: Arc::new(model),
            interrupt,
            doorbell: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            image: file,
            capacity_sectors,
            read_only,
            flushes: Mutex::new(FlushCount::default()),
        })
    }

    /// The QEMU model.
    pub fn model(&self) -> &Arc<QemuModel> {
        &self.model
    }
}

impl Hardware for QemuNvme {
    fn windows(&self) -> Vec<HardwareWindow> {
        Vec::new()
    }

    fn traps(&self) -> Vec<TrapWindow> {
        let model = self.model.clone();
        vec![TrapWindow { name: "regs", size: self.model.bar0_size(), connect: Arc::new(move || model.connect()) }]
    }

    fn doorbell(&self) -> &EventFd {
        &self.doorbell
    }

    fn interrupt(&self) -> Arc<InterruptRoute> {
        self.interrupt.clone()
    }

    fn quiesce(&self) {
        if let Err(error) = self.model.quiesce() {
            tracing::error!(%error, "cannot quiesce the NVMe controller");
        }
    }

    fn resume(&self) {
        if let Err(error) = self.model.resume() {
            tracing::error!(%error, "cannot resume the NVMe controller");
        }
    }
}

impl BlockHardware for QemuNvme {
    fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    /// The evidence a flush is judged on, made by the reflector itself:
    /// QEMU's controller keeps no count a driver could not fake, so each
    /// call syncs the image (`fdatasync`, on the reflector's own
    /// descriptor of the file QEMU writes through the page cache) and
    /// counts it. A flush the driver acknowledges is judged after a sync
    /// that began after it was sent, so every write completed before it is
    /// on the medium whatever the driver did.
    fn flushes(&self) -> FlushCount {
        let Ok(mut flushes) = self.flushes.lock() else { return FlushCount::default() };
        flushes.started += 1;
        // SAFETY: fdatasync on a descriptor this struct owns.
        if unsafe { libc::fdatasync(self.image.as_raw_fd()) } == 0 {
            flushes.completed = flushes.started;
        } else {
            tracing::error!(error = %std::io::Error::last_os_error(), "cannot sync the NVMe image");
        }
        *flushes
    }
}
