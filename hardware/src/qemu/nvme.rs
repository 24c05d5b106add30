//! QEMU's NVMe controller as the block hardware of a device: the model in
//! its QEMU process, reached by the driver VM through a trapped BAR0
//! window (`proxy`), DMA into the channel's bounce slots and device area.
//!
//! The QEMU process is supervised like a driver VM: one found dead when
//! the next driver VM starts (`resume`) is started again, on the same
//! image, DMA region and interrupt route; the new driver resets the new
//! controller and the reflector replays what the old one held.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use vmm_sys_util::eventfd::EventFd;

use super::{Dma, Model, ModelError, QemuModel};
use crate::shm::SharedMemory;
use crate::{BlockHardware, FlushCount, Hardware, HardwareWindow, InterruptRoute, TrapWindow};

/// An NVMe controller (QEMU's model) on a raw image.
pub struct QemuNvme {
    process: Arc<Process>,
    interrupt: Arc<InterruptRoute>,
    /// NVMe doorbells are in BAR0: nothing rings this one.
    doorbell: EventFd,
    image: File,
    capacity_sectors: u64,
    read_only: bool,
    flushes: Mutex<FlushCount>,
}

/// The QEMU process behind the controller, and how to start it again.
struct Process {
    current: RwLock<Arc<QemuModel>>,
    qemu: PathBuf,
    model: Model,
    serial: String,
    dma: Arc<SharedMemory>,
    offset: usize,
    len: usize,
    interrupt: Arc<InterruptRoute>,
}

impl Process {
    fn start(&self) -> Result<QemuModel, ModelError> {
        let dma = Dma { memory: &self.dma, offset: self.offset, len: self.len };
        QemuModel::start(&self.qemu, self.model.clone(), &self.serial, dma, self.interrupt.clone(), None)
    }

    fn current(&self) -> Arc<QemuModel> {
        match self.current.read() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

impl QemuNvme {
    /// Starts QEMU (`qemu`) with an NVMe controller on `image`, able to
    /// reach `len` bytes of `dma` from `offset`.
    pub fn start(
        qemu: &Path,
        name: &str,
        image: &Path,
        read_only: bool,
        dma: &Arc<SharedMemory>,
        offset: usize,
        len: usize,
    ) -> Result<QemuNvme, ModelError> {
        let file = File::options().read(true).write(!read_only).open(image)?;
        let capacity_sectors = file.metadata()?.len() / 512;
        let interrupt = Arc::new(InterruptRoute::default());
        let model = Model::Nvme { image: image.to_owned(), read_only };
        let serial: String = name.chars().filter(char::is_ascii_alphanumeric).take(20).collect();
        let region = Dma { memory: dma, offset, len };
        let first = QemuModel::start(qemu, model.clone(), &serial, region, interrupt.clone(), None)?;
        let process = Process {
            current: RwLock::new(Arc::new(first)),
            qemu: qemu.to_owned(),
            model,
            serial,
            dma: dma.clone(),
            offset,
            len,
            interrupt: interrupt.clone(),
        };
        Ok(QemuNvme {
            process: Arc::new(process),
            interrupt,
            doorbell: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            image: file,
            capacity_sectors,
            read_only,
            flushes: Mutex::new(FlushCount::default()),
        })
    }

    /// The QEMU model now serving.
    pub fn model(&self) -> Arc<QemuModel> {
        self.process.current()
    }
}

impl Hardware for QemuNvme {
    fn windows(&self) -> Vec<HardwareWindow> {
        Vec::new()
    }

    fn traps(&self) -> Vec<TrapWindow> {
        let process = self.process.clone();
        vec![TrapWindow {
            name: "regs",
            size: self.process.current().bar0_size(),
            // Each driver VM connects to the QEMU serving when it starts.
            connect: Arc::new(move || process.current().connect()),
        }]
    }

    fn doorbell(&self) -> &EventFd {
        &self.doorbell
    }

    fn interrupt(&self) -> Arc<InterruptRoute> {
        self.interrupt.clone()
    }

    fn quiesce(&self) {
        let model = self.process.current();
        if let Err(error) = model.quiesce() {
            tracing::error!(%error, running = model.running(), "cannot quiesce the NVMe controller");
        }
    }

    fn resume(&self) {
        let model = self.process.current();
        if !model.running() || model.resume().is_err() {
            tracing::warn!(image = ?self.process.model, "the QEMU device model is gone; starting it again");
            match self.process.start() {
                Ok(fresh) => match self.process.current.write() {
                    Ok(mut current) => *current = Arc::new(fresh),
                    Err(poisoned) => *poisoned.into_inner() = Arc::new(fresh),
                },
                Err(error) => tracing::error!(%error, "cannot start the QEMU device model again"),
            }
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
