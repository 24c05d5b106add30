//! An NVMe controller behind VFIO as the block hardware of a device: BAR0
//! mapped into the driver VM (doorbells without exits), DMA through the
//! IOMMU into the channel's bounce slots and device area only, MSI-X
//! vector 0 forwarded to the current driver VM.
//!
//! At start the reflector itself brings the controller up once (the `nvme`
//! core, in the device area no driver uses yet) to learn the namespace's
//! size, the capacity the vhost-user client is told, then resets it.
//!
//! Flush evidence: a real controller keeps no flush count the host can
//! read, so on VFIO hardware the reflector cannot witness a flush; a
//! driver's flush acknowledgement is taken as given (docs/threat-model.md).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::passthrough::PassedThrough;
use super::{Interrupts, Passthrough, VfioError, VfioFunction, DMA_BASE};
use crate::shm::SharedMemory;
use crate::{BlockHardware, FlushCount};

/// An NVMe controller bound to vfio-pci.
pub struct VfioNvme {
    passthrough: Passthrough,
    capacity_sectors: u64,
    read_only: bool,
}

/// Longest a quiesce waits for a controller to say it stopped, whatever
/// its CAP.TO (up to 127.5 s): past it the device is taken for running.
const DISABLE_WAIT_MOST: Duration = Duration::from_secs(2);

/// CC.EN = 0: the controller drops its queues (done after the function
/// reset too, for controllers without FLR), then waits for CSTS.RDY to
/// clear: until it does, the controller may still be working through what
/// a dead driver queued. Bounded by CAP.TO and [`DISABLE_WAIT_MOST`];
/// whether it cleared. Before, the quiesce returned at the write, and bus
/// mastering came back on while the controller was still resetting (an
/// adversarial review found it).
fn disable(regs: &SharedMemory) -> bool {
    use std::sync::atomic::Ordering;
    regs.atomic_u32(nvme::regs::CC).store(0, Ordering::Release);
    let cap = u64::from(regs.atomic_u32(nvme::regs::CAP).load(Ordering::Acquire));
    let timeout = Duration::from_millis(nvme::regs::Capabilities::decode(cap).timeout_ms).min(DISABLE_WAIT_MOST);
    let deadline = Instant::now() + timeout;
    crate::poll_until(deadline, Duration::from_micros(10), Duration::from_millis(1), || stopped(regs).then_some(()))
        .is_some()
}

/// CSTS.RDY clear: the controller has stopped.
fn stopped(regs: &SharedMemory) -> bool {
    regs.atomic_u32(nvme::regs::CSTS).load(std::sync::atomic::Ordering::Acquire) & nvme::regs::CSTS_READY == 0
}

/// BAR0 as the `nvme` core reaches it.
pub struct MappedRegisters<'a>(pub &'a SharedMemory);

impl nvme::Registers for MappedRegisters<'_> {
    fn read32(&self, offset: usize) -> u32 {
        if offset.is_multiple_of(4) && offset + 4 <= self.0.size() {
            self.0.atomic_u32(offset).load(std::sync::atomic::Ordering::Acquire)
        } else {
            u32::MAX
        }
    }

    fn write32(&self, offset: usize, value: u32) {
        if offset.is_multiple_of(4) && offset + 4 <= self.0.size() {
            self.0.atomic_u32(offset).store(value, std::sync::atomic::Ordering::Release);
        }
    }
}

/// The DMA range as the `nvme` core reaches it: region offsets from
/// `offset`, seen by the controller at [`DMA_BASE`].
pub struct MappedDma<'a> {
    /// The region.
    pub memory: &'a SharedMemory,
    /// Where the range starts in it.
    pub offset: usize,
}

impl nvme::DmaMemory for MappedDma<'_> {
    fn device_address(&self, offset: usize) -> u64 {
        DMA_BASE + offset as u64
    }

    fn write(&self, offset: usize, bytes: &[u8]) {
        if let Some(slice) = self.memory.slice(self.offset + offset, bytes.len()) {
            slice.copy_from(bytes);
        }
    }

    fn read(&self, offset: usize, bytes: &mut [u8]) {
        if let Some(slice) = self.memory.slice(self.offset + offset, bytes.len()) {
            slice.copy_to(bytes);
        }
    }
}

/// Microseconds since it was made.
pub struct Stopwatch(pub Instant);

impl nvme::Clock for Stopwatch {
    fn now_us(&self) -> u64 {
        self.0.elapsed().as_micros() as u64
    }
}

impl VfioNvme {
    /// Opens the NVMe controller at PCI `address`, lets it reach `len`
    /// bytes of `dma` from `offset` (at [`DMA_BASE`]), and reads its
    /// namespace's size using `area` (an offset in that range, at least
    /// `nvme::Layout::AREA` bytes no driver uses yet) for the admin queue.
    pub fn start(
        address: &str,
        read_only: bool,
        dma: &Arc<SharedMemory>,
        offset: usize,
        len: usize,
        area: usize,
    ) -> Result<VfioNvme, VfioError> {
        let unsuitable = |detail: String| VfioError::Unsuitable { address: address.to_owned(), detail };
        if area.checked_add(nvme::Layout::AREA).is_none_or(|end| end > len) {
            return Err(unsuitable(format!("the admin area {area:#x} does not fit the DMA range of {len:#x} bytes")));
        }
        let mut passthrough = Passthrough::open(address, dma, offset, len)?;
        let namespace = {
            let controller = nvme::Controller::start(
                MappedRegisters(passthrough.regs()),
                MappedDma { memory: dma, offset },
                Stopwatch(Instant::now()),
                nvme::Layout::at(area),
            )
            .map_err(|error| unsuitable(format!("the NVMe controller did not come up: {error:?}")))?;
            controller.namespace()
        };
        // The reflector's queues are forgotten: the first driver resets
        // the controller, as every driver does.
        passthrough.quiesce(disable);
        passthrough.resume(stopped);
        passthrough.route(Interrupts::MsiX)?;
        tracing::info!(address, bytes = namespace.bytes(), "VFIO NVMe controller ready");
        Ok(VfioNvme { passthrough, capacity_sectors: namespace.bytes() / 512, read_only })
    }

    /// The function.
    pub fn function(&self) -> &VfioFunction {
        self.passthrough.function()
    }
}

impl PassedThrough for VfioNvme {
    fn passthrough(&self) -> &Passthrough {
        &self.passthrough
    }

    fn device_reset(regs: &SharedMemory) -> bool {
        disable(regs)
    }

    fn device_stopped(regs: &SharedMemory) -> bool {
        stopped(regs)
    }
}

impl BlockHardware for VfioNvme {
    fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    /// Unwitnessed (see the module's doc): every flush counts as done.
    fn flushes(&self) -> FlushCount {
        FlushCount { started: 0, completed: u64::MAX, medium_failed: false }
    }

    fn flush_mark(&self) -> u64 {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    /// A BAR0 in memory: CAP with TO = 1 (500 ms), CSTS.RDY as `ready`.
    fn bar(ready: bool) -> Arc<SharedMemory> {
        let regs = Arc::new(SharedMemory::new("fake-nvme-bar", 4096).unwrap());
        regs.atomic_u32(nvme::regs::CAP).store(1 << 24, Ordering::SeqCst);
        regs.atomic_u32(nvme::regs::CC).store(nvme::regs::CC_ENABLE, Ordering::SeqCst);
        regs.atomic_u32(nvme::regs::CSTS).store(u32::from(ready), Ordering::SeqCst);
        regs
    }

    /// The quiesce returns only once the controller says it stopped
    /// (CSTS.RDY clear), and says whether it did within CAP.TO.
    #[test]
    fn a_disabled_controller_is_waited_for_until_it_says_it_stopped() {
        assert!(disable(&bar(false)), "a controller already stopped");
        // One that stops a while after it is told to: a thread plays it.
        let regs = bar(true);
        let controller = {
            let regs = regs.clone();
            std::thread::spawn(move || {
                while regs.atomic_u32(nvme::regs::CC).load(Ordering::SeqCst) & nvme::regs::CC_ENABLE != 0 {
                    std::thread::yield_now();
                }
                for _ in 0..1000 {
                    std::thread::yield_now();
                }
                regs.atomic_u32(nvme::regs::CSTS).store(0, Ordering::SeqCst);
            })
        };
        assert!(disable(&regs), "the controller stopped within CAP.TO");
        assert_eq!(regs.atomic_u32(nvme::regs::CSTS).load(Ordering::SeqCst), 0, "returned before it stopped");
        controller.join().unwrap();
        // One that never stops.
        assert!(!disable(&bar(true)), "a controller that never stopped was taken for stopped");
    }
}
