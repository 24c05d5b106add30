//! Controller registers (NVMe base specification 1.4, section 3.1).

/// Controller Capabilities (64 bits).
pub const CAP: usize = 0x00;
/// Version.
pub const VS: usize = 0x08;
/// Interrupt Mask Set.
pub const INTMS: usize = 0x0c;
/// Interrupt Mask Clear.
pub const INTMC: usize = 0x10;
/// Controller Configuration.
pub const CC: usize = 0x14;
/// Controller Status.
pub const CSTS: usize = 0x1c;
/// Admin Queue Attributes.
pub const AQA: usize = 0x24;
/// Admin Submission Queue base (64 bits).
pub const ASQ: usize = 0x28;
/// Admin Completion Queue base (64 bits).
pub const ACQ: usize = 0x30;
/// First doorbell.
pub const DOORBELLS: usize = 0x1000;

/// CC.EN.
pub const CC_ENABLE: u32 = 1;
/// CC.IOSQES = 6 (64-byte submission entries), CC.IOCQES = 4 (16-byte
/// completion entries), CC.CSS = 0 (NVM), CC.MPS = 0 (4 KiB), CC.AMS = 0
/// (round robin).
pub const CC_CONFIG: u32 = (6 << 16) | (4 << 20);
/// CSTS.RDY.
pub const CSTS_READY: u32 = 1;
/// CSTS.CFS (controller fatal status).
pub const CSTS_FATAL: u32 = 1 << 1;

/// The fields of CAP the driver needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Largest queue, in entries (MQES + 1).
    pub max_queue_entries: u32,
    /// Worst-case time for CSTS.RDY to change, in milliseconds (TO x 500).
    pub timeout_ms: u64,
    /// Bytes between doorbells (4 << DSTRD).
    pub doorbell_stride: usize,
    /// The NVM command set is supported (CSS bit 0).
    pub nvm: bool,
    /// Smallest memory page, in bytes (4 KiB << MPSMIN).
    pub min_page: usize,
}

impl Capabilities {
    /// Decodes CAP.
    pub fn decode(cap: u64) -> Self {
        Capabilities {
            max_queue_entries: (cap & 0xffff) as u32 + 1,
            timeout_ms: ((cap >> 24) & 0xff).max(1) * 500,
            doorbell_stride: 4 << ((cap >> 32) & 0xf),
            nvm: (cap >> 37) & 1 == 1,
            min_page: 4096 << ((cap >> 48) & 0xf),
        }
    }
}

/// The offset of submission queue `queue`'s tail doorbell.
pub fn sq_tail_doorbell(queue: u16, stride: usize) -> usize {
    DOORBELLS + 2 * usize::from(queue) * stride
}

/// The offset of completion queue `queue`'s head doorbell.
pub fn cq_head_doorbell(queue: u16, stride: usize) -> usize {
    DOORBELLS + (2 * usize::from(queue) + 1) * stride
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_of_qemus_controller_decode() {
        // CAP read from QEMU 10.0's nvme model.
        let cap = Capabilities::decode(0x0040_0820_0f01_07ff);
        assert_eq!(
            cap,
            Capabilities { max_queue_entries: 2048, timeout_ms: 7500, doorbell_stride: 4, nvm: true, min_page: 4096 }
        );
        assert_eq!((sq_tail_doorbell(1, 4), cq_head_doorbell(1, 4)), (0x1008, 0x100c));
    }
}
