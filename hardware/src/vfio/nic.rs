//! An Intel e1000e-family NIC behind VFIO as the network card of a device:
//! BAR0 mapped into the driver VM, DMA through the IOMMU into the channel's
//! bounce slots and device area only, MSI forwarded to the current driver
//! VM (the driver reads the interrupt cause register, as with INTx). The
//! card's network side is its own port, not the reflector's switch: what it
//! sends leaves on the physical wire.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::passthrough::PassedThrough;
use super::{Interrupts, Passthrough, VfioError, VfioFunction};
use crate::shm::SharedMemory;
use crate::NetHardware;

/// Registers the reflector reads (Intel 82574L datasheet, section 10).
mod reg {
    pub const CTRL: usize = 0x0000;
    pub const STATUS: usize = 0x0008;
    /// CTRL: device reset (self-clearing).
    pub const CTRL_RST: u32 = 1 << 26;
    pub const RAL0: usize = 0x5400;
    pub const RAH0: usize = 0x5404;
    /// STATUS: link up.
    pub const STATUS_LU: u32 = 1 << 1;
}

/// An Intel e1000e NIC bound to vfio-pci.
pub struct VfioNic {
    passthrough: Passthrough,
    mac: [u8; 6],
}

impl VfioNic {
    /// Opens the NIC at PCI `address` and lets it reach `len` bytes of
    /// `dma` from `offset`; its MAC address is the one the card holds
    /// (receive address 0, loaded from its EEPROM at reset).
    pub fn start(address: &str, dma: &Arc<SharedMemory>, offset: usize, len: usize) -> Result<VfioNic, VfioError> {
        let mut passthrough = Passthrough::open(address, dma, offset, len)?;
        let regs = passthrough.regs();
        let (low, high) = (read(regs, reg::RAL0).to_le_bytes(), read(regs, reg::RAH0).to_le_bytes());
        let mac = [low[0], low[1], low[2], low[3], high[0], high[1]];
        if mac == [0xff; 6] || mac == [0; 6] {
            return Err(VfioError::Unsuitable {
                address: address.to_owned(),
                detail: "the card holds no MAC address (receive address 0 is empty): not an e1000e?".into(),
            });
        }
        passthrough.route(Interrupts::Msi)?;
        tracing::info!(address, ?mac, "VFIO NIC ready");
        Ok(VfioNic { passthrough, mac })
    }

    /// The function.
    pub fn function(&self) -> &VfioFunction {
        self.passthrough.function()
    }
}

/// CTRL.RST: the card empties its rings and forgets their addresses (a
/// function reset may not reach its state: QEMU's e1000e has no FLR).
fn reset(regs: &SharedMemory) -> bool {
    // A read and a write: no locked read-modify-write on device memory.
    let ctrl = read(regs, reg::CTRL);
    regs.atomic_u32(reg::CTRL).store(ctrl | reg::CTRL_RST, Ordering::Release);
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(100);
    while !reset_done(regs) {
        if std::time::Instant::now() > deadline {
            tracing::error!("the NIC did not finish its reset within 100 ms");
            return false;
        }
        std::thread::yield_now();
    }
    true
}

/// CTRL.RST clear: the card's reset is done.
fn reset_done(regs: &SharedMemory) -> bool {
    read(regs, reg::CTRL) & reg::CTRL_RST == 0
}

fn read(regs: &SharedMemory, offset: usize) -> u32 {
    regs.atomic_u32(offset).load(Ordering::Acquire)
}

impl PassedThrough for VfioNic {
    fn passthrough(&self) -> &Passthrough {
        &self.passthrough
    }

    fn device_reset(regs: &SharedMemory) -> bool {
        reset(regs)
    }

    fn device_stopped(regs: &SharedMemory) -> bool {
        reset_done(regs)
    }
}

impl NetHardware for VfioNic {
    fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn link_up(&self) -> bool {
        read(self.passthrough.regs(), reg::STATUS) & reg::STATUS_LU != 0
    }
}
