//! A QEMU device model's process, supervised like a driver VM: one found
//! dead when the next driver VM starts (`resume`) is started again with
//! the same model, DMA region, interrupt route and (for a NIC) the same
//! end of its network cable; the new driver resets the new device and the
//! reflector replays what the old one held. Every QEMU-backed device
//! (NVMe, e1000e) holds one of these, so a dead device process is never a
//! dead device.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use vmm_sys_util::eventfd::EventFd;

use super::{Dma, Model, ModelError, PostedRegisters, ProcessJail, QemuModel};
use crate::shm::SharedMemory;
use crate::{InterruptRoute, TrapConnection, TrapWindow};

/// Everything needed to start the device's QEMU (again).
pub struct ProcessSpec {
    /// The `qemu-system-x86_64` binary.
    pub qemu: PathBuf,
    /// The device model.
    pub model: Model,
    /// Serial number (NVMe) or name shown in logs.
    pub serial: String,
    /// The shared region the DMA range is part of.
    pub dma: Arc<SharedMemory>,
    /// Where the device's range starts in it.
    pub offset: usize,
    /// Bytes of the range.
    pub len: usize,
    /// Where the device's interrupts go.
    pub interrupt: Arc<InterruptRoute>,
    /// QEMU's end of a NIC's cable, kept here so that a restarted card is
    /// plugged into the same switch port.
    pub wire: Option<OwnedFd>,
    /// The jail each QEMU process starts in.
    pub jail: Option<Arc<dyn ProcessJail>>,
    /// Where in `dma` the driver leaves its posted registers' values
    /// (`channel::POSTED_MIRROR_OFFSET`); `None`: every access is trapped.
    pub posted_mirror: Option<usize>,
    /// What the driver's accesses to BAR0 may cost the proxy's threads
    /// (`proxy::ACCESS_WORK` each), if they are judged so.
    pub work: Option<Arc<crate::WorkAllowance>>,
}

/// The QEMU process serving a device now, restarted when found dead.
pub struct SupervisedModel {
    current: RwLock<Arc<QemuModel>>,
    spec: ProcessSpec,
    restarts: AtomicU64,
    /// Written when a serving QEMU process exits (`watch_failure`).
    failure: Mutex<Option<EventFd>>,
    /// Shut down for good: no process is started again.
    stopped: AtomicBool,
}

impl SupervisedModel {
    /// Starts the first QEMU process.
    pub fn start(spec: ProcessSpec) -> Result<SupervisedModel, ModelError> {
        let first = Self::launch(&spec)?;
        Ok(SupervisedModel {
            current: RwLock::new(Arc::new(first)),
            spec,
            restarts: AtomicU64::new(0),
            failure: Mutex::new(None),
            stopped: AtomicBool::new(false),
        })
    }

    fn launch(spec: &ProcessSpec) -> Result<QemuModel, ModelError> {
        let dma = Dma { memory: &spec.dma, offset: spec.offset, len: spec.len };
        let (model, interrupt, jail) = (spec.model.clone(), spec.interrupt.clone(), spec.jail.clone());
        QemuModel::start(&spec.qemu, model, &spec.serial, dma, interrupt, spec.wire.as_ref(), jail)
    }

    /// Writes `failure` whenever the QEMU process serving exits: the
    /// device kills its driver VM at once (its hardware is gone), and the
    /// next driver VM's start (`resume`) starts QEMU again.
    pub fn watch_failure(&self, failure: EventFd) {
        self.current().notify_exit(failure.try_clone().ok());
        if let Ok(mut current) = self.failure.lock() {
            *current = Some(failure);
        }
    }

    /// The QEMU model serving now.
    pub fn current(&self) -> Arc<QemuModel> {
        match self.current.read() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// How many times the process was started again.
    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }

    /// BAR0 as a trapped window: each driver VM connects to the QEMU
    /// serving when it starts. With a posted mirror, the model's doorbells
    /// are posted registers.
    pub fn trap(self: &Arc<Self>) -> TrapWindow {
        let posted = self.spec.posted_mirror.map(|mirror| PostedRegisters {
            memory: self.spec.dma.clone(),
            mirror,
            offsets: self.spec.model.posted_registers(),
        });
        let supervised = self.clone();
        TrapWindow {
            name: "regs",
            size: self.current().bar0_size(),
            posted: posted.as_ref().map(|p| p.offsets.clone()).unwrap_or_default(),
            connect: Arc::new(move || supervised.connect(posted.as_ref())),
        }
    }

    /// A connection to the process serving now. A spare may connect while
    /// the process is being replaced: one its connections were already
    /// handed over from refuses, and the new one, current once the
    /// hand-over ends (`resume` holds `current` meanwhile), takes it.
    fn connect(&self, posted: Option<&PostedRegisters>) -> std::io::Result<TrapConnection> {
        let mut attempts = 0;
        loop {
            match self.current().connect(posted, self.spec.work.clone()) {
                Err(error) if error.to_string() == super::proxy::REPLACED && attempts < 3 => attempts += 1,
                result => return result,
            }
        }
    }

    /// Stops the device's DMA (see [`QemuModel::quiesce`]); a process
    /// already dead has none.
    pub fn quiesce(&self) {
        // Stopped (the reflector is going): its process is killed, and
        // nothing runs on it any more that could need quiescing.
        if self.stopped.load(Ordering::Acquire) {
            return;
        }
        let model = self.current();
        // Killed already (one that has not ended is replaced only once it
        // has, `resume`): asked, it would keep the device's worker until
        // the answer's timeout.
        if model.killed() {
            return;
        }
        match model.quiesce() {
            // A device whose interrupt line stays asserted through its
            // reset is in a state no driver can recover from (see
            // `QemuModel::line_asserted`): this process is replaced.
            Ok(()) if model.line_asserted() => {
                tracing::warn!(
                    model = ?self.spec.model,
                    "the device's interrupt line stayed asserted through its reset; starting its QEMU again"
                );
                model.kill();
            }
            Ok(()) => {}
            // Killed on purpose while it was being quiesced (the reflector
            // stopping): nothing is left to quiesce.
            Err(error) if model.killed() => tracing::debug!(%error, "the device model was killed while quiesced"),
            // A device that could not be quiesced may still reach the
            // bounce slots the replay is about to reuse: its process is
            // killed (and reaped) now, and `resume` starts a new one.
            Err(error) => {
                tracing::error!(%error, model = ?self.spec.model, "cannot quiesce the device; starting its QEMU again");
                model.kill();
            }
        }
    }

    /// Has the next [`SupervisedModel::resume`] start a new QEMU process:
    /// drivers keep dying at their start, and what a dead one left in the
    /// machine may outlive the device's reset (Format NVM to another LBA
    /// format: every later `Identify` finds a namespace the driver refuses).
    pub fn renew(&self) {
        // Killed already: its next `resume` replaces it once it has ended
        // (killed again, it would keep the device's worker for the kill's
        // waits each time).
        if !self.stopped.load(Ordering::Acquire) && !self.current().killed() {
            tracing::warn!(model = ?self.spec.model, "drivers keep failing at their start; starting the device's QEMU again");
            self.current().kill();
        }
    }

    /// Lets the next driver use the device; a QEMU process that died or
    /// does not answer is replaced by a new one first, once it has ended.
    pub fn resume(&self) {
        let model = self.current();
        if self.stopped.load(Ordering::Acquire) || !model.killed() && model.running() && model.resume().is_ok() {
            return;
        }
        if !model.killed() {
            model.kill();
        }
        // One killed while its storage hung lives on in the kernel, its
        // SIGKILL pending: a read it had under way still lands in the DMA
        // region when the storage answers, in a bounce slot a replay has
        // refilled by then. No new process starts (so no driver gets the
        // device, and nothing is replayed) until it has ended; each
        // driver's start looks again.
        if !model.ended() {
            tracing::error!(
                pid = model.pid(),
                model = ?self.spec.model,
                "the device's QEMU process was killed but has not ended (stuck in the kernel?): no new one starts until it has"
            );
            return;
        }
        tracing::warn!(model = ?self.spec.model, "the QEMU device model is gone; starting it again");
        match Self::launch(&self.spec) {
            Ok(fresh) => {
                self.restarts.fetch_add(1, Ordering::Relaxed);
                if let Ok(failure) = self.failure.lock() {
                    fresh.notify_exit(failure.as_ref().and_then(|fd| fd.try_clone().ok()));
                }
                let fresh = Arc::new(fresh);
                // Held through the hand-over: a spare connecting meanwhile
                // is refused by the old process and waits for the new one.
                let mut current = self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner());
                // A spare connected to the old process drives this one.
                model.connections.hand_over_silent(&fresh);
                *current = fresh;
            }
            Err(error) => tracing::error!(%error, model = ?self.spec.model, "cannot start the QEMU device model again"),
        }
    }

    /// The reflector is stopping: kills the QEMU process (not reported as
    /// a failure) and starts none again.
    pub fn stop(&self) {
        if !self.stopped.swap(true, Ordering::AcqRel) {
            self.current().kill();
        }
    }

    /// [`SupervisedModel::stop`], then ends its jail's cgroups.
    pub fn shut_down(&self) {
        self.stop();
        if let Some(jail) = &self.spec.jail {
            jail.end();
        }
    }

    /// Whether the process serving now runs.
    pub fn running(&self) -> bool {
        self.current().running()
    }
}
