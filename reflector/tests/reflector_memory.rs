//! The reflector's own memory, as `status` and the metrics report it
//! (`FleetStatus`), leaves out its clients' RAM: it maps each client's
//! memory table, and every page of it that it touched (descriptors, frames,
//! the data it copies) counts in its resident set, up to the whole of a
//! guest's RAM; QEMU owns that memory. Before, a reflector serving one
//! QEMU guest that ran fio reported 13.1 MiB against its budget of 10.25.
//! Its own process, so that no other test's memory moves the figures.

use std::fs::File;
use std::os::fd::FromRawFd;

use reflector::control::FleetStatus;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

const CLIENT_MIB: usize = 48;

#[test]
fn the_reflectors_own_memory_leaves_out_the_client_memory_it_maps() {
    // SAFETY: memfd_create with a static name; checked below.
    let fd = unsafe { libc::memfd_create(c"client-ram".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor we own.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len((CLIENT_MIB << 20) as u64).unwrap();
    let region = MmapRegion::from_file(FileOffset::new(file, 0), CLIENT_MIB << 20).unwrap();
    let memory = GuestMemoryMmap::from_regions(vec![GuestRegionMmap::new(region, GuestAddress(0)).unwrap()]).unwrap();
    let registration = reflector::client_memory::guard(&memory).unwrap();
    // Every page touched, as the reflector's copies touch a busy guest's.
    let chunk = vec![0x5a_u8; 1 << 20];
    for mib in 0..CLIENT_MIB {
        memory.write_slice(&chunk, GuestAddress((mib << 20) as u64)).unwrap();
    }
    let fleet = FleetStatus::of(&[]);
    assert!(
        fleet.client_memory_kib >= (CLIENT_MIB as u64) << 10,
        "{} KiB of the client's memory seen, {CLIENT_MIB} MiB touched",
        fleet.client_memory_kib
    );
    assert!(
        fleet.reflector_rss_kib < fleet.reflector_budget_kib,
        "the reflector's own memory {} KiB (its clients' {} KiB left out) is over its budget {} KiB",
        fleet.reflector_rss_kib,
        fleet.client_memory_kib,
        fleet.reflector_budget_kib
    );
    // Once the table is no longer the client's (it went away), its pages
    // still mapped are counted as the reflector's: nothing is left out that
    // is not a client's.
    drop(registration);
    let unregistered = FleetStatus::of(&[]);
    assert_eq!(unregistered.client_memory_kib, 0);
    assert!(unregistered.reflector_rss_kib >= (CLIENT_MIB as u64) << 10, "{unregistered:?}");
    drop(memory);
}
