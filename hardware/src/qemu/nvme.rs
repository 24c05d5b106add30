//! QEMU's NVMe controller as the block hardware of a device: the model in
//! its QEMU process, reached by the driver VM through a trapped BAR0
//! window (`proxy`), DMA into the channel's bounce slots and device area.
//!
//! The QEMU process is supervised like a driver VM ([`SupervisedModel`]).

use crate::shared_eventfd::SharedEventFd;
use std::fs::File;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::supervised::{ProcessSpec, SupervisedModel};
use super::{Drive, Model, ModelError, QemuModel, QemuProcess};
use crate::shm::SharedMemory;
use crate::{BlockHardware, FlushCount, Hardware, HardwareWindow, HostSync, InterruptRoute, TrapWindow};

/// An NVMe controller (QEMU's model) on a raw image.
pub struct QemuNvme {
    process: Arc<SupervisedModel>,
    /// What its driver's accesses to BAR0 cost the proxy's threads
    /// (`proxy::ACCESS_WORK` each), within the grants of the requests
    /// handed to it and a spare.
    work: Arc<crate::WorkAllowance>,
    interrupt: Arc<InterruptRoute>,
    /// NVMe doorbells are in BAR0: nothing rings this one.
    doorbell: SharedEventFd,
    capacity_sectors: u64,
    read_only: bool,
    flushes: HostSync,
}

impl QemuNvme {
    /// Starts QEMU (`qemu`) with an NVMe controller on `drive`, able to
    /// reach `len` bytes of `dma` from `offset`. With `posted_mirror` (an
    /// offset in `dma`: `channel::POSTED_MIRROR_OFFSET`), the I/O queue's
    /// doorbells are posted registers whose values the driver leaves
    /// there (its shadow doorbells); without, every access is trapped.
    pub fn start(
        qemu: &QemuProcess,
        name: &str,
        drive: Drive,
        dma: &Arc<SharedMemory>,
        offset: usize,
        len: usize,
        posted_mirror: Option<usize>,
    ) -> Result<QemuNvme, ModelError> {
        let read_only = drive.read_only;
        let file = File::options().read(true).write(!read_only).open(&drive.image)?;
        let capacity_sectors = file.metadata()?.len() / 512;
        let interrupt = Arc::new(InterruptRoute::default());
        let work = Arc::new(crate::WorkAllowance::with_spare(crate::WORK_SPARE));
        let process = SupervisedModel::start(ProcessSpec {
            qemu: qemu.binary.clone(),
            jail: qemu.jail.clone(),
            model: Model::Nvme(drive),
            serial: name.chars().filter(char::is_ascii_alphanumeric).take(20).collect(),
            dma: dma.clone(),
            offset,
            len,
            interrupt: interrupt.clone(),
            wire: None,
            posted_mirror,
            work: Some(work.clone()),
        })?;
        Ok(QemuNvme {
            process: Arc::new(process),
            work,
            interrupt,
            doorbell: SharedEventFd::new()?,
            capacity_sectors,
            read_only,
            flushes: HostSync::new(file, "the NVMe image"),
        })
    }

    /// The QEMU model now serving.
    pub fn model(&self) -> Arc<QemuModel> {
        self.process.current()
    }

    /// How many times its QEMU process was started again.
    pub fn restarts(&self) -> u64 {
        self.process.restarts()
    }
}

impl Hardware for QemuNvme {
    fn windows(&self) -> Vec<HardwareWindow> {
        Vec::new()
    }

    fn traps(&self) -> Vec<TrapWindow> {
        vec![self.process.trap()]
    }

    fn doorbell(&self) -> &SharedEventFd {
        &self.doorbell
    }

    fn interrupt(&self) -> Arc<InterruptRoute> {
        self.interrupt.clone()
    }

    fn quiesce(&self) {
        self.process.quiesce();
    }

    fn resume(&self) {
        // A new driver starts with the spare alone.
        self.work.forgive();
        self.process.resume();
    }

    fn work(&self) -> Option<&crate::WorkAllowance> {
        Some(&self.work)
    }

    fn renew(&self) {
        self.process.renew();
    }

    fn watch_failure(&self, failure: EventFd) {
        self.process.watch_failure(failure);
    }

    fn stop(&self) {
        self.process.stop();
    }

    fn shut_down(&self) {
        self.process.shut_down();
    }
}

impl BlockHardware for QemuNvme {
    fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    /// The reflector's own syncs of the image: QEMU's controller keeps no
    /// count a driver could not fake ([`HostSync`]).
    fn flushes(&self) -> FlushCount {
        self.flushes.counts()
    }

    fn flush_mark(&self) -> u64 {
        self.flushes.mark()
    }
    /// The image QEMU writes through the page cache (`cache=writeback`,
    /// raw), read through the host's own descriptor.
    fn medium(&self) -> Option<&std::fs::File> {
        Some(self.flushes.image())
    }
}
