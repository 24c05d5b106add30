//! The slice of the kernel's VFIO ABI (`include/uapi/linux/vfio.h`) this
//! crate uses: the type1 IOMMU container, groups, a PCI device's regions,
//! interrupts and reset. Every ioctl is `_IO(';', 100 + n)`: VFIO passes
//! the structure's size in its `argsz` field instead of the number.

use std::os::fd::RawFd;

const VFIO_TYPE: u64 = b';' as u64;
const VFIO_BASE: u64 = 100;

const fn io(n: u64) -> u64 {
    (VFIO_TYPE << 8) | (VFIO_BASE + n)
}

pub const GET_API_VERSION: u64 = io(0);
pub const CHECK_EXTENSION: u64 = io(1);
pub const SET_IOMMU: u64 = io(2);
pub const GROUP_GET_STATUS: u64 = io(3);
pub const GROUP_SET_CONTAINER: u64 = io(4);
pub const GROUP_GET_DEVICE_FD: u64 = io(6);
pub const DEVICE_GET_INFO: u64 = io(7);
pub const DEVICE_GET_REGION_INFO: u64 = io(8);
pub const DEVICE_GET_IRQ_INFO: u64 = io(9);
pub const DEVICE_SET_IRQS: u64 = io(10);
pub const DEVICE_RESET: u64 = io(11);
pub const IOMMU_MAP_DMA: u64 = io(13);
pub const IOMMU_UNMAP_DMA: u64 = io(14);

pub const API_VERSION: i32 = 0;
pub const TYPE1V2_IOMMU: u64 = 3;
pub const TYPE1_IOMMU: u64 = 1;

pub const GROUP_FLAGS_VIABLE: u32 = 1 << 0;
pub const DEVICE_FLAGS_RESET: u32 = 1 << 0;
pub const DEVICE_FLAGS_PCI: u32 = 1 << 1;

pub const PCI_CONFIG_REGION_INDEX: u32 = 7;
pub const PCI_MSI_IRQ_INDEX: u32 = 1;
pub const PCI_MSIX_IRQ_INDEX: u32 = 2;

pub const IRQ_SET_DATA_NONE: u32 = 1 << 0;
pub const IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
pub const IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;

pub const DMA_MAP_FLAG_READ: u32 = 1 << 0;
pub const DMA_MAP_FLAG_WRITE: u32 = 1 << 1;

#[repr(C)]
#[derive(Default)]
pub struct GroupStatus {
    pub argsz: u32,
    pub flags: u32,
}

#[repr(C)]
#[derive(Default)]
pub struct DeviceInfo {
    pub argsz: u32,
    pub flags: u32,
    pub num_regions: u32,
    pub num_irqs: u32,
}

#[repr(C)]
#[derive(Default, Clone, Copy, Debug)]
pub struct RegionInfo {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub cap_offset: u32,
    pub size: u64,
    pub offset: u64,
}

#[repr(C)]
#[derive(Default)]
pub struct IrqInfo {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub count: u32,
}

/// `vfio_irq_set` with room for one eventfd.
#[repr(C)]
pub struct IrqSetOne {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub start: u32,
    pub count: u32,
    pub fd: RawFd,
}

/// `vfio_irq_set` with no data.
#[repr(C)]
pub struct IrqSetNone {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub start: u32,
    pub count: u32,
}

#[repr(C)]
pub struct DmaMap {
    pub argsz: u32,
    pub flags: u32,
    pub vaddr: u64,
    pub iova: u64,
    pub size: u64,
}

#[repr(C)]
pub struct DmaUnmap {
    pub argsz: u32,
    pub flags: u32,
    pub iova: u64,
    pub size: u64,
}

/// `argsz` of a structure.
pub const fn argsz<T>() -> u32 {
    std::mem::size_of::<T>() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_sizes_match_the_kernel_header() {
        // VFIO_GET_API_VERSION is _IO(';', 100) = 0x3b64.
        assert_eq!(GET_API_VERSION, 0x3b64);
        assert_eq!(IOMMU_UNMAP_DMA, 0x3b72);
        assert_eq!(argsz::<RegionInfo>(), 32);
        assert_eq!(argsz::<DmaMap>(), 32);
        assert_eq!(argsz::<DmaUnmap>(), 24);
        assert_eq!(argsz::<IrqSetOne>(), 24);
        assert_eq!(argsz::<DeviceInfo>(), 16);
    }
}
