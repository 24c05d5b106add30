//! A client's memory table: regions of any size and offset on a memfd of
//! any size, checked and guarded as SET_MEM_TABLE does; then the memfd
//! shrinks and the regions are read and written, as a hostile client makes
//! happen. Nothing may panic or take the process down (SIGBUS is guarded).
#![no_main]

use std::fs::File;
use std::os::fd::FromRawFd;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use reflector::client_memory;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

#[derive(Arbitrary, Debug)]
struct Table {
    file_pages: u8,
    regions: Vec<(u16, u8, u8)>,
    shrink_to_pages: u8,
    touches: Vec<(u32, u8)>,
}

fuzz_target!(|table: Table| {
    // SAFETY: memfd_create with a static name.
    let fd = unsafe { libc::memfd_create(c"fuzz-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return;
    }
    // SAFETY: a fresh descriptor we own.
    let file = unsafe { File::from_raw_fd(fd) };
    if file.set_len(u64::from(table.file_pages) * 4096).is_err() {
        return;
    }
    let mut regions = Vec::new();
    let mut next = 0u64;
    for (gpa_pages, offset_pages, size_pages) in table.regions.into_iter().take(8) {
        let size = (usize::from(size_pages) + 1) * 4096;
        let Ok(copy) = file.try_clone() else { return };
        let Ok(mapping) = MmapRegion::from_file(FileOffset::new(copy, u64::from(offset_pages) * 4096), size) else {
            continue;
        };
        let gpa = next.max(u64::from(gpa_pages) * 4096);
        let Some(region) = GuestRegionMmap::new(mapping, GuestAddress(gpa)) else { continue };
        next = gpa + size as u64;
        regions.push(region);
    }
    let Ok(memory) = GuestMemoryMmap::from_regions(regions) else { return };
    let Ok(registration) = client_memory::guard(&memory) else { return };
    let _ = file.set_len(u64::from(table.shrink_to_pages) * 4096);
    for (address, value) in table.touches.into_iter().take(16) {
        let address = GuestAddress(u64::from(address) % next.max(1));
        let _ = memory.write_obj(value, address);
        let _: Result<u8, _> = memory.read_obj(address);
    }
    let _ = registration.poisoned();
});
