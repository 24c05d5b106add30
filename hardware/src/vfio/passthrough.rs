//! What every VFIO-backed device shares: the function opened and quiet,
//! the IOMMU mapping only the DMA range, BAR0 as the driver VM's window,
//! vector 0 forwarded to the current driver VM, and the quiesce and resume
//! of a driver VM's death. The device kinds (`VfioNvme`, `VfioNic`) add only
//! what the reflector must know of their device.

use crate::shared_eventfd::SharedEventFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::{Interrupts, VfioError, VfioFunction, DMA_BASE};
use crate::shm::SharedMemory;
use crate::{Hardware, HardwareWindow, InterruptRoute};

/// A PCI function bound to vfio-pci, wired as a driver VM's hardware.
pub struct Passthrough {
    function: VfioFunction,
    regs: Arc<SharedMemory>,
    interrupt: Arc<InterruptRoute>,
    /// The device's doorbells are in BAR0: nothing rings this one.
    doorbell: SharedEventFd,
    /// Vector 0's eventfd, while a thread forwards it; its stop.
    vector: Option<(Arc<EventFd>, EventFd)>,
    /// The last quiesce could not be sure the device stopped: bus
    /// mastering stays off ([`Passthrough::resume`]).
    unstopped: AtomicBool,
}

impl Passthrough {
    /// Opens the function at `address`, stops whatever a previous user left
    /// running (bus mastering off, a function reset), lets it reach `len`
    /// bytes of `dma` from `offset` at [`DMA_BASE`], maps BAR0 and turns bus
    /// mastering on. Interrupts are routed later ([`Passthrough::route`]).
    pub fn open(address: &str, dma: &SharedMemory, offset: usize, len: usize) -> Result<Passthrough, VfioError> {
        let function = VfioFunction::open(address)?;
        function.set_bus_master(false)?;
        function.reset()?;
        function.map_dma(dma, offset, len, DMA_BASE)?;
        let regs = Arc::new(function.bar_window(0)?);
        function.set_bus_master(true)?;
        let unsuitable = |error: std::io::Error| VfioError::Unsuitable {
            address: address.to_owned(),
            detail: format!("cannot make an eventfd: {error}"),
        };
        let doorbell = SharedEventFd::new().map_err(unsuitable)?;
        Ok(Passthrough {
            function,
            regs,
            interrupt: Arc::new(InterruptRoute::default()),
            doorbell,
            vector: None,
            unstopped: AtomicBool::new(false),
        })
    }

    /// Sends vector 0 of `kind` to the current driver VM (through a thread
    /// that forwards its eventfd to the interrupt route).
    pub fn route(&mut self, kind: Interrupts) -> Result<(), VfioError> {
        let address = self.function.address().to_owned();
        let unsuitable = |detail: String| VfioError::Unsuitable { address: address.clone(), detail };
        if self.function.vectors(kind)? == 0 {
            return Err(unsuitable(format!("no {kind:?} vector: the driver's interrupts need one")));
        }
        let eventfd = || EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|e| unsuitable(e.to_string()));
        let (vector, stop) = (Arc::new(eventfd()?), eventfd()?);
        self.function.route_vector(kind, Some(&vector))?;
        let (thread_vector, route) = (vector.clone(), self.interrupt.clone());
        let thread_stop = stop.try_clone().map_err(|e| unsuitable(e.to_string()))?;
        std::thread::Builder::new()
            .name(format!("{address}-irq"))
            .spawn(move || {
                while crate::wait_for_doorbell(&thread_vector, &thread_stop) {
                    route.raise();
                }
            })
            .map_err(|e| unsuitable(e.to_string()))?;
        self.vector = Some((vector, stop));
        Ok(())
    }

    /// The function.
    pub fn function(&self) -> &VfioFunction {
        &self.function
    }

    /// BAR0, as mapped.
    pub fn regs(&self) -> &Arc<SharedMemory> {
        &self.regs
    }

    /// BAR0 as the driver VM's window `regs`.
    pub fn windows(&self) -> Vec<HardwareWindow> {
        vec![HardwareWindow { name: "regs", memory: self.regs.clone() }]
    }

    /// The (unused) doorbell.
    pub fn doorbell(&self) -> &SharedEventFd {
        &self.doorbell
    }

    /// Where vector 0 goes.
    pub fn interrupt(&self) -> Arc<InterruptRoute> {
        self.interrupt.clone()
    }

    /// Bus mastering off, a function reset, then `device_reset` (the
    /// device's own reset through BAR0, for functions whose reset the
    /// kernel cannot do or does not reach the device's state, which says
    /// whether the device has stopped): nothing the dead driver queued runs
    /// after the replay begins. Each step is tried whatever the one before
    /// did (before, a failure to turn bus mastering off skipped the
    /// reset); if the device does not say it stopped, bus mastering stays
    /// off at [`Passthrough::resume`]: a device still
    /// working through a dead driver's commands would write its reads into
    /// slots the replay refilled, and VFIO writes are not read back.
    pub fn quiesce(&self, device_reset: impl FnOnce(&SharedMemory) -> bool) {
        if let Err(error) = self.function.set_bus_master(false) {
            tracing::error!(%error, "cannot turn the VFIO function's bus mastering off");
        }
        if let Err(error) = self.function.reset() {
            tracing::error!(%error, "cannot reset the VFIO function");
        }
        // The device's own word decides: a function without a reset the
        // kernel can do reports none done, not a failure.
        let stopped = device_reset(&self.regs);
        if !stopped {
            tracing::error!("the VFIO device did not stop: its bus mastering stays off, and its requests fail");
        }
        self.unstopped.store(!stopped, Ordering::SeqCst);
    }

    /// Bus mastering on for the next driver, which resets the device;
    /// left off after a quiesce that could not stop it, unless the device
    /// says by now (`stopped`) that it has (a slow reset, past the
    /// quiesce's bound).
    pub fn resume(&self, stopped: impl FnOnce(&SharedMemory) -> bool) {
        if self.unstopped.load(Ordering::SeqCst) {
            if !stopped(&self.regs) {
                tracing::error!("the VFIO device did not stop at its last quiesce: its bus mastering stays off");
                return;
            }
            self.unstopped.store(false, Ordering::SeqCst);
        }
        if let Err(error) = self.function.set_bus_master(true) {
            tracing::error!(%error, "cannot resume the VFIO function");
        }
    }
}

impl Drop for Passthrough {
    fn drop(&mut self) {
        if let Some((_, stop)) = &self.vector {
            let _ = stop.write(1);
        }
    }
}

/// A device kind behind a [`Passthrough`]: the [`Hardware`] of every such
/// kind is its passthrough's, with the kind's own register-level reset.
pub trait PassedThrough: Send + Sync {
    /// The function, wired.
    fn passthrough(&self) -> &Passthrough;
    /// The device's own reset through BAR0, after the function reset;
    /// whether the device says it has stopped.
    fn device_reset(regs: &SharedMemory) -> bool;
    /// Whether the device says it has stopped (its reset done), without
    /// waiting.
    fn device_stopped(regs: &SharedMemory) -> bool;
}

impl<T: PassedThrough> Hardware for T {
    fn windows(&self) -> Vec<HardwareWindow> {
        self.passthrough().windows()
    }

    fn doorbell(&self) -> &SharedEventFd {
        self.passthrough().doorbell()
    }

    fn interrupt(&self) -> Arc<InterruptRoute> {
        self.passthrough().interrupt()
    }

    fn quiesce(&self) {
        self.passthrough().quiesce(T::device_reset);
    }

    fn resume(&self) {
        self.passthrough().resume(T::device_stopped);
    }
}
