//! The door for real hardware: a PCI function bound to `vfio-pci`, driven
//! by a driver VM as any other device.
//!
//! What the driver VM gets: BAR0 as a window mapped straight into its
//! address space (the BAR's sysfs `resource0` file, which can be mapped and
//! nothing else: no ioctl reaches the function through it), so doorbells
//! cost no exit. What only the reflector holds: the VFIO container (the
//! IOMMU: it maps the DMA region and nothing else, at the addresses the
//! driver uses), the VFIO device (configuration space, bus mastering,
//! function reset, interrupts). MSI-X vector 0 signals an eventfd the
//! reflector forwards to the current driver VM. When a driver VM dies,
//! bus mastering goes off and the function is reset before the next one
//! starts.
//!
//! The reflector never maps a BAR through VFIO itself: vfio-pci then claims
//! the BAR, and a kernel with `CONFIG_IO_STRICT_DEVMEM` (Debian's) refuses
//! the sysfs mapping the driver VM needs.
//!
//! Not here: the device's protocol (the driver's, and `nvme` for the
//! reflector's one identify at start, [`VfioNvme`]).

mod nic;
mod nvme;
mod passthrough;
mod sys;

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

pub use nic::VfioNic;
pub use nvme::{MappedDma, MappedRegisters, Stopwatch, VfioNvme};
pub use passthrough::Passthrough;

use crate::shm::SharedMemory;

/// Where the function sees the DMA region (the IOMMU maps it there).
pub use crate::DMA_BASE;

/// What went wrong opening or driving a VFIO function. Each names the PCI
/// address and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    /// Not a PCI address.
    #[error("{0:?} is not a PCI address (expected DDDD:BB:DD.F, e.g. 0000:01:00.0)")]
    Address(String),
    /// No such function.
    #[error("{0}: no such PCI device (see /sys/bus/pci/devices)")]
    NoDevice(String),
    /// Bound to another driver, or to none.
    #[error(
        "{address}: its driver is {driver}, not vfio-pci (hand it over: echo vfio-pci > \
         /sys/bus/pci/devices/{address}/driver_override; if it has a driver, echo {address} > \
         /sys/bus/pci/devices/{address}/driver/unbind; then echo {address} > /sys/bus/pci/drivers_probe)"
    )]
    NotBound {
        /// The function.
        address: String,
        /// Its driver now.
        driver: String,
    },
    /// No IOMMU group: the IOMMU is off.
    #[error("{0}: no IOMMU group (enable the IOMMU: intel_iommu=on or amd_iommu=on on the kernel command line)")]
    NoIommuGroup(String),
    /// VFIO itself is missing.
    #[error("/dev/vfio/vfio: {0} (load the vfio-pci and vfio_iommu_type1 modules)")]
    NoVfio(std::io::Error),
    /// The group is held by another process.
    #[error("{address}: IOMMU group {group} is in use by another process (another reflector or a VMM)")]
    InUse {
        /// The function.
        address: String,
        /// Its group.
        group: String,
    },
    /// Other functions of the group are bound to host drivers.
    #[error("{address}: IOMMU group {group} is not viable: bind every device in /sys/kernel/iommu_groups/{group}/devices to vfio-pci")]
    NotViable {
        /// The function.
        address: String,
        /// Its group.
        group: String,
    },
    /// A VFIO call failed.
    #[error("{address}: {what}: {error}")]
    Call {
        /// The function.
        address: String,
        /// The call.
        what: &'static str,
        /// Why.
        error: std::io::Error,
    },
    /// The function is not what its user needs.
    #[error("{address}: {detail}")]
    Unsuitable {
        /// The function.
        address: String,
        /// What is missing.
        detail: String,
    },
}

/// A PCI function bound to vfio-pci, held open by the reflector: its
/// container (IOMMU), group and device.
pub struct VfioFunction {
    address: String,
    container: File,
    /// Held for the device's lifetime (closing it detaches the container).
    _group: File,
    device: File,
    flags: u32,
    config: sys::RegionInfo,
    /// IOMMU mappings made, unmapped when dropped.
    mapped: Mutex<Vec<(u64, u64)>>,
    /// The interrupts routed, turned off when dropped.
    routed: Mutex<Option<Interrupts>>,
}

/// PCI configuration space offsets and bits.
mod pci {
    pub const COMMAND: u64 = 0x04;
    pub const MEMORY: u16 = 1 << 1;
    pub const BUS_MASTER: u16 = 1 << 2;
}

/// Whether `address` is a PCI address (`DDDD:BB:DD.F`).
pub fn is_pci_address(address: &str) -> bool {
    let bytes = address.as_bytes();
    let hex = |range: std::ops::Range<usize>| bytes[range].iter().all(u8::is_ascii_hexdigit);
    bytes.len() == 12
        && hex(0..4)
        && bytes[4] == b':'
        && hex(5..7)
        && bytes[7] == b':'
        && hex(8..10)
        && bytes[10] == b'.'
        && (b'0'..=b'7').contains(&bytes[11])
}

impl VfioFunction {
    /// Opens the function at `address` (`DDDD:BB:DD.F`), which must be
    /// bound to vfio-pci, alone or with its whole IOMMU group.
    pub fn open(address: &str) -> Result<VfioFunction, VfioError> {
        if !is_pci_address(address) {
            return Err(VfioError::Address(address.to_owned()));
        }
        let owned = address.to_owned();
        let sysfs = PathBuf::from("/sys/bus/pci/devices").join(address);
        if !sysfs.exists() {
            return Err(VfioError::NoDevice(owned));
        }
        let driver = std::fs::read_link(sysfs.join("driver"))
            .ok()
            .and_then(|link| link.file_name().map(|name| name.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "no driver".into());
        if driver != "vfio-pci" {
            return Err(VfioError::NotBound { address: owned, driver });
        }
        let group = std::fs::read_link(sysfs.join("iommu_group"))
            .ok()
            .and_then(|link| link.file_name().map(|name| name.to_string_lossy().into_owned()))
            .ok_or_else(|| VfioError::NoIommuGroup(owned.clone()))?;
        let open =
            |path: &str| std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_CLOEXEC).open(path);
        let container = open("/dev/vfio/vfio").map_err(VfioError::NoVfio)?;
        let call = |what: &'static str| {
            let address = owned.clone();
            move |error| VfioError::Call { address, what, error }
        };
        // SAFETY: a VFIO ioctl with no argument on the container we opened.
        let version = unsafe { libc::ioctl(container.as_raw_fd(), sys::GET_API_VERSION as _) };
        if version != sys::API_VERSION {
            return Err(VfioError::Unsuitable { address: owned, detail: format!("VFIO API version {version}, not 0") });
        }
        let iommu = [sys::TYPE1V2_IOMMU, sys::TYPE1_IOMMU]
            .into_iter()
            // SAFETY: a VFIO ioctl taking an integer, on our container.
            .find(|&kind| unsafe { libc::ioctl(container.as_raw_fd(), sys::CHECK_EXTENSION as _, kind) } > 0)
            .ok_or_else(|| VfioError::Unsuitable {
                address: owned.clone(),
                detail: "the kernel offers no type1 IOMMU for VFIO (load vfio_iommu_type1)".into(),
            })?;
        let group_file = match open(&format!("/dev/vfio/{group}")) {
            Ok(file) => file,
            Err(error) if error.raw_os_error() == Some(libc::EBUSY) => {
                return Err(VfioError::InUse { address: owned, group })
            }
            Err(error) => return Err(call("opening its VFIO group")(error)),
        };
        let mut status = sys::GroupStatus { argsz: sys::argsz::<sys::GroupStatus>(), flags: 0 };
        // SAFETY: the ioctl writes a vfio_group_status we own.
        check(unsafe { libc::ioctl(group_file.as_raw_fd(), sys::GROUP_GET_STATUS as _, &mut status) })
            .map_err(call("reading its group's status"))?;
        if status.flags & sys::GROUP_FLAGS_VIABLE == 0 {
            return Err(VfioError::NotViable { address: owned, group });
        }
        let container_fd = container.as_raw_fd();
        // SAFETY: the ioctl reads an int (the container's fd) we own.
        check(unsafe { libc::ioctl(group_file.as_raw_fd(), sys::GROUP_SET_CONTAINER as _, &container_fd) })
            .map_err(call("attaching its group to a container"))?;
        // SAFETY: a VFIO ioctl taking an integer, on our container.
        check(unsafe { libc::ioctl(container_fd, sys::SET_IOMMU as _, iommu) })
            .map_err(call("setting the container's IOMMU (is interrupt remapping on?)"))?;
        let name = CString::new(address).map_err(|_| VfioError::Address(owned.clone()))?;
        // SAFETY: the ioctl reads a NUL-terminated string we own and
        // returns a new descriptor or -1.
        let fd = unsafe { libc::ioctl(group_file.as_raw_fd(), sys::GROUP_GET_DEVICE_FD as _, name.as_ptr()) };
        check(fd).map_err(call("opening the device"))?;
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let device = unsafe { File::from_raw_fd(fd) };
        // VFIO device descriptors are created close-on-exec (anon inode,
        // O_CLOEXEC): no driver VM inherits one.
        let mut info = sys::DeviceInfo { argsz: sys::argsz::<sys::DeviceInfo>(), ..Default::default() };
        // SAFETY: the ioctl writes a vfio_device_info we own.
        check(unsafe { libc::ioctl(device.as_raw_fd(), sys::DEVICE_GET_INFO as _, &mut info) })
            .map_err(call("reading the device's information"))?;
        if info.flags & sys::DEVICE_FLAGS_PCI == 0 || info.num_regions <= sys::PCI_CONFIG_REGION_INDEX {
            return Err(VfioError::Unsuitable { address: owned, detail: "not a PCI device".into() });
        }
        let mut function = VfioFunction {
            address: owned,
            container,
            _group: group_file,
            device,
            flags: info.flags,
            config: sys::RegionInfo::default(),
            mapped: Mutex::new(Vec::new()),
            routed: Mutex::new(None),
        };
        function.config = function.region(sys::PCI_CONFIG_REGION_INDEX)?;
        Ok(function)
    }

    /// The PCI address.
    pub fn address(&self) -> &str {
        &self.address
    }

    fn call(&self, what: &'static str) -> impl FnOnce(std::io::Error) -> VfioError + '_ {
        move |error| VfioError::Call { address: self.address.clone(), what, error }
    }

    /// Region `index` (BARs 0-5, 7 configuration space).
    fn region(&self, index: u32) -> Result<sys::RegionInfo, VfioError> {
        let mut info = sys::RegionInfo { argsz: sys::argsz::<sys::RegionInfo>(), index, ..Default::default() };
        // SAFETY: the ioctl writes a vfio_region_info we own.
        check(unsafe { libc::ioctl(self.device.as_raw_fd(), sys::DEVICE_GET_REGION_INFO as _, &mut info) })
            .map_err(self.call("reading a region's information"))?;
        Ok(info)
    }

    /// Bytes of BAR `index` (0 if it is not implemented).
    pub fn bar_size(&self, index: u32) -> Result<u64, VfioError> {
        self.region(index).map(|info| info.size)
    }

    /// BAR `index` as a window: its sysfs `resource` file mapped, which a
    /// driver VM's vmm can map and nothing more.
    pub fn bar_window(&self, index: u32) -> Result<SharedMemory, VfioError> {
        let size = self.bar_size(index)?;
        if size == 0 || !size.is_multiple_of(4096) {
            return Err(VfioError::Unsuitable {
                address: self.address.clone(),
                detail: format!("BAR{index} is {size} bytes: not a window of whole pages"),
            });
        }
        let path = PathBuf::from("/sys/bus/pci/devices").join(&self.address).join(format!("resource{index}"));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(self.call("opening the BAR's sysfs resource file"))?;
        SharedMemory::map_file(file, size as usize).map_err(self.call("mapping the BAR's sysfs resource file"))
    }

    /// Reads the configuration word at `offset`.
    pub fn config_read16(&self, offset: u64) -> Result<u16, VfioError> {
        let mut bytes = [0u8; 2];
        self.device
            .read_exact_at(&mut bytes, self.config.offset + offset)
            .map_err(self.call("reading config space"))?;
        Ok(u16::from_le_bytes(bytes))
    }

    /// Writes the configuration word at `offset`.
    pub fn config_write16(&self, offset: u64, value: u16) -> Result<(), VfioError> {
        self.device
            .write_all_at(&value.to_le_bytes(), self.config.offset + offset)
            .map_err(self.call("writing config space"))
    }

    /// Turns memory space on and bus mastering on or off.
    pub fn set_bus_master(&self, on: bool) -> Result<(), VfioError> {
        let command = self.config_read16(pci::COMMAND)?;
        let wanted = (command | pci::MEMORY) & !pci::BUS_MASTER | if on { pci::BUS_MASTER } else { 0 };
        self.config_write16(pci::COMMAND, wanted)
    }

    /// Whether bus mastering is on.
    pub fn bus_master(&self) -> Result<bool, VfioError> {
        Ok(self.config_read16(pci::COMMAND)? & pci::BUS_MASTER != 0)
    }

    /// Resets the function (FLR or what the kernel can do); false when it
    /// offers no reset.
    pub fn reset(&self) -> Result<bool, VfioError> {
        if self.flags & sys::DEVICE_FLAGS_RESET == 0 {
            return Ok(false);
        }
        // SAFETY: a VFIO ioctl with no argument on our device.
        check(unsafe { libc::ioctl(self.device.as_raw_fd(), sys::DEVICE_RESET as _) })
            .map_err(self.call("resetting the function"))?;
        Ok(true)
    }

    /// Lets the function reach `len` bytes of `memory` from `offset` at
    /// IOMMU address `iova`, and nothing else it was not given.
    pub fn map_dma(&self, memory: &SharedMemory, offset: usize, len: usize, iova: u64) -> Result<(), VfioError> {
        let range = memory.slice(offset, len).ok_or_else(|| VfioError::Unsuitable {
            address: self.address.clone(),
            detail: format!("DMA range {offset:#x}+{len:#x} is outside its region"),
        })?;
        let map = sys::DmaMap {
            argsz: sys::argsz::<sys::DmaMap>(),
            flags: sys::DMA_MAP_FLAG_READ | sys::DMA_MAP_FLAG_WRITE,
            vaddr: range.ptr_guard().as_ptr() as u64,
            iova,
            size: len as u64,
        };
        // Before the mapping: from here on, no page of it is released
        // (the IOMMU would keep the old ones).
        memory.pin();
        // SAFETY: the ioctl reads a vfio_iommu_type1_dma_map we own; the
        // mapping it pins lives in `memory`, which the caller keeps alive
        // as long as this function (see `Drop`, which unmaps it).
        check(unsafe { libc::ioctl(self.container.as_raw_fd(), sys::IOMMU_MAP_DMA as _, &map) })
            .map_err(self.call("mapping the DMA region in the IOMMU"))?;
        if let Ok(mut mapped) = self.mapped.lock() {
            mapped.push((iova, len as u64));
        }
        Ok(())
    }

    /// How many vectors the function has of `kind`.
    pub fn vectors(&self, kind: Interrupts) -> Result<u32, VfioError> {
        let mut info = sys::IrqInfo { argsz: sys::argsz::<sys::IrqInfo>(), index: kind.index(), ..Default::default() };
        // SAFETY: the ioctl writes a vfio_irq_info we own.
        check(unsafe { libc::ioctl(self.device.as_raw_fd(), sys::DEVICE_GET_IRQ_INFO as _, &mut info) })
            .map_err(self.call("reading its interrupt information"))?;
        Ok(info.count)
    }

    /// Sends vector 0 of `kind` to `trigger`; none: that kind off.
    pub fn route_vector(&self, kind: Interrupts, trigger: Option<&EventFd>) -> Result<(), VfioError> {
        let result = match trigger {
            Some(eventfd) => {
                let set = sys::IrqSetOne {
                    argsz: sys::argsz::<sys::IrqSetOne>(),
                    flags: sys::IRQ_SET_DATA_EVENTFD | sys::IRQ_SET_ACTION_TRIGGER,
                    index: kind.index(),
                    start: 0,
                    count: 1,
                    fd: eventfd.as_raw_fd(),
                };
                // SAFETY: the ioctl reads a vfio_irq_set with one eventfd.
                unsafe { libc::ioctl(self.device.as_raw_fd(), sys::DEVICE_SET_IRQS as _, &set) }
            }
            None => {
                let set = sys::IrqSetNone {
                    argsz: sys::argsz::<sys::IrqSetNone>(),
                    flags: sys::IRQ_SET_DATA_NONE | sys::IRQ_SET_ACTION_TRIGGER,
                    index: kind.index(),
                    start: 0,
                    count: 0,
                };
                // SAFETY: the ioctl reads a vfio_irq_set with no data.
                unsafe { libc::ioctl(self.device.as_raw_fd(), sys::DEVICE_SET_IRQS as _, &set) }
            }
        };
        check(result).map_err(self.call("routing an interrupt vector"))?;
        if let Ok(mut routed) = self.routed.lock() {
            *routed = trigger.map(|_| kind);
        }
        Ok(())
    }
}

/// Which message-signalled interrupts a function's vector 0 is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interrupts {
    /// MSI (one message: a NIC whose driver reads the cause register).
    Msi,
    /// MSI-X (an NVMe controller's completion queue vector 0).
    MsiX,
}

impl Interrupts {
    fn index(self) -> u32 {
        match self {
            Interrupts::Msi => sys::PCI_MSI_IRQ_INDEX,
            Interrupts::MsiX => sys::PCI_MSIX_IRQ_INDEX,
        }
    }
}

impl Drop for VfioFunction {
    fn drop(&mut self) {
        if let Some(kind) = self.routed.lock().ok().and_then(|routed| *routed) {
            let _ = self.route_vector(kind, None);
        }
        let _ = self.set_bus_master(false);
        let mapped = self.mapped.lock().map(|mapped| mapped.clone()).unwrap_or_default();
        for (iova, size) in mapped {
            let unmap = sys::DmaUnmap { argsz: sys::argsz::<sys::DmaUnmap>(), flags: 0, iova, size };
            // SAFETY: the ioctl reads a vfio_iommu_type1_dma_unmap we own.
            unsafe { libc::ioctl(self.container.as_raw_fd(), sys::IOMMU_UNMAP_DMA as _, &unmap) };
        }
    }
}

fn check(result: libc::c_int) -> std::io::Result<()> {
    if result < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_addresses_are_checked_before_anything_is_opened() {
        assert!(is_pci_address("0000:01:00.0"));
        assert!(is_pci_address("abcd:ff:1f.7"));
        for bad in ["", "01:00.0", "0000:01:00.8", "0000:01:00:0", "0000/01:00.0", "../../../etc", "0000:01:00.0 "] {
            assert!(matches!(VfioFunction::open(bad), Err(VfioError::Address(_))), "{bad:?}");
        }
        // A well-formed address with no device says so.
        assert!(matches!(VfioFunction::open("ffff:ff:1f.7"), Err(VfioError::NoDevice(_))));
    }
}
