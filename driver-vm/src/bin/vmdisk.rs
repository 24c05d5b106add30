//! `vmdisk`: a RAM disk whose data lives in device memory (window `disk`,
//! which the reflector maps from the disk image with `device=memory`), not
//! in the driver: a driver VM's memory is wiped at every restart, and a RAM
//! disk that kept its blocks there would lose them all at the first one
//! (the restart contract, docs/writing-a-driver.md). The CPU is this
//! device's DMA engine: the driver copies between the bounce slots and the
//! disk, and checks every request against the disk's size first.
#![no_std]
#![cfg_attr(not(test), no_main)]

use driver_vm::channel::{Channel, ChannelDriver, Device};
use driver_vm::kernel::abi::channel::{inject, op, slot_offset, status, RequestEntry, SLOT_SIZE};
use driver_vm::kernel::device::Window;
use driver_vm::{Error, Kernel};

/// Bytes per sector.
const SECTOR: u64 = 512;

struct VmDisk {
    disk: Window,
}

impl ChannelDriver for VmDisk {
    const NAME: &'static str = "vmdisk";
    const FAULTS: &'static [u32] = &[inject::SKIP_WRITES];

    fn probe(kernel: &Kernel, _channel: &Channel) -> Result<Self, Error> {
        let disk = kernel.window("disk").ok_or(Error::MissingWindow("disk"))?;
        if disk.size() < SECTOR {
            return Err(Error::Device("window `disk` is smaller than a sector"));
        }
        // Nothing to reset: the device is memory, and its contents are the
        // disk's, which a new driver must keep.
        Ok(VmDisk { disk })
    }
}

impl VmDisk {
    /// The disk's byte range of `request`, if it fits the disk and a slot.
    fn range(&self, request: &RequestEntry) -> Option<core::ops::Range<usize>> {
        let start = request.sector.checked_mul(SECTOR)?;
        let end = start.checked_add(u64::from(request.len))?;
        let fits = end <= self.disk.size() && request.len <= SLOT_SIZE && u64::from(request.len) % SECTOR == 0;
        (fits && Channel::slot_ok(request)).then_some(start as usize..end as usize)
    }
}

impl Device for VmDisk {
    fn submit(&mut self, channel: &mut Channel, request: RequestEntry) {
        if request.op == op::FLUSH {
            // Writes are in device memory once copied; the reflector makes
            // them durable (it syncs the image for every flush).
            return channel.complete(request.id, status::OK, 0);
        }
        let Some(range) = self.range(&request) else {
            return channel.complete(request.id, status::IO_ERROR, 0);
        };
        let slot = slot_offset(request.slot);
        let slot = slot..slot + range.len();
        match request.op {
            op::READ => channel.window().as_mut_slice()[slot].copy_from_slice(&self.disk.as_slice()[range]),
            op::WRITE => self.disk.as_mut_slice()[range].copy_from_slice(&channel.window().as_slice()[slot]),
            _ => return channel.complete(request.id, status::UNSUPPORTED, 0),
        }
        channel.complete(request.id, status::OK, request.len);
    }
}

driver_vm::channel_driver_main!(VmDisk);

#[cfg(test)]
mod tests {
    extern crate std;
    use driver_vm::kernel::abi::channel::status;
    use driver_vm::testing::{Bench, Completion};
    use std::string::ToString;
    use std::vec;
    use std::vec::Vec;

    use super::VmDisk;

    const DISK: usize = 1 << 20;

    #[test]
    fn a_write_is_read_back_and_lands_in_device_memory() {
        let mut bench = Bench::new().with_device_memory("disk", DISK);
        let mut disk = bench.start::<VmDisk>().unwrap();
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
        let write = bench.write(3, &data);
        disk.drain().unwrap();
        let read = bench.read(3, 8192);
        disk.drain().unwrap();
        let ok = |id, len| Completion { id, status: status::OK, len };
        assert_eq!(bench.completions(), vec![ok(write, 8192), ok(read, 8192)]);
        assert_eq!(bench.slot(read, 8192), &data[..]);
        assert_eq!(&bench.device_memory("disk")[3 * 512..3 * 512 + 8192], &data[..]);
    }

    #[test]
    fn data_survives_a_restart_of_the_driver() {
        let mut bench = Bench::new().with_device_memory("disk", DISK);
        let first = bench.start::<VmDisk>().unwrap();
        let mut first = first;
        bench.write(100, &[0xab; 4096]);
        first.drain().unwrap();
        drop(first);
        // A new driver, as after a driver VM's death: its memory is new.
        let mut second = bench.start::<VmDisk>().unwrap();
        let read = bench.read(100, 4096);
        second.drain().unwrap();
        assert!(bench.completions().iter().any(|c| c.id == read && c.status == status::OK));
        assert_eq!(bench.slot(read, 4096), &[0xab; 4096][..]);
    }

    #[test]
    fn requests_beyond_the_disk_or_unaligned_fail_and_change_nothing() {
        let mut bench = Bench::new().with_device_memory("disk", DISK);
        let mut disk = bench.start::<VmDisk>().unwrap();
        let last_sector = (DISK / 512) as u64 - 1;
        let beyond = bench.write(last_sector, &[1; 1024]);
        let huge = bench.read(u64::MAX / 2, 512);
        let odd = bench.write(0, &[1; 100]);
        let fits = bench.write(last_sector, &[2; 512]);
        disk.drain().unwrap();
        let statuses: Vec<(u64, u32)> = bench.completions().iter().map(|c| (c.id, c.status)).collect();
        assert_eq!(
            statuses,
            vec![(beyond, status::IO_ERROR), (huge, status::IO_ERROR), (odd, status::IO_ERROR), (fits, status::OK)]
        );
        assert!(bench.device_memory("disk")[..DISK - 512].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_missing_disk_window_is_a_clear_error() {
        let bench = Bench::new();
        let error = bench.start::<VmDisk>().err().unwrap();
        assert!(error.to_string().contains("disk"), "{error}");
    }
}
