//! The simulated storage controller's engine with per-request DMA windows
//! (`dma=direct`) against a hostile driver, the windows mapped and revoked
//! as the reflector would: the device may reach client memory only through
//! a mapped window and in its direction. Client memory is laid out so that
//! any other access shows: device-readable windows lie in the first quarter
//! (filled with a pattern that must survive), device-writable ones in the
//! second, and the second half is never mapped (it must stay zero).
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};

use arbitrary::Arbitrary;
use driver_vms_fuzz::{clear_storage_window, memfd_medium, storage_step, StorageStep};
use guest_abi::storage;
use libfuzzer_sys::fuzz_target;
use reflector::hw::dma_windows::{DeviceAccess, DmaWindows, Window};
use reflector::hw::sim_storage::EngineHarness;
use reflector::shm::SharedMemory;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

#[derive(Arbitrary, Debug)]
enum Step {
    Driver(StorageStep),
    Map { index: u8, device_writes: bool, buffers: Vec<(u16, u16)> },
    Unmap { index: u8 },
}

const BASE: u64 = 0x4000_0000;
const GRANULE: u32 = 128 << 10;
const WINDOWS: u32 = 4;
const QUARTER: u64 = 64 << 10;
const PATTERN: u8 = 0xa5;

struct Rig {
    regs: Arc<SharedMemory>,
    image: std::fs::File,
}

static RIG: OnceLock<Mutex<Rig>> = OnceLock::new();

fuzz_target!(|steps: Vec<Step>| {
    let rig = RIG.get_or_init(|| {
        Mutex::new(Rig {
            regs: Arc::new(SharedMemory::new("regs", storage::WINDOW_SIZE).expect("regs")),
            image: memfd_medium(1 << 20),
        })
    });
    let rig = rig.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    clear_storage_window(&rig.regs);
    let client = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 * QUARTER as usize)]).expect("memory"));
    client.write_slice(&[PATTERN; QUARTER as usize], GuestAddress(0)).expect("pattern");
    let windows = DmaWindows::new(BASE, GRANULE, WINDOWS);
    let Ok(medium) = rig.image.try_clone() else { return };
    let Ok(mut engine) = EngineHarness::new_direct(rig.regs.clone(), windows.clone(), medium, false) else { return };
    for step in steps.into_iter().take(128) {
        match step {
            Step::Driver(step) => {
                let span = u64::from(GRANULE) * u64::from(WINDOWS + 1);
                storage_step(&mut engine, &rig.regs, step, BASE, span);
            }
            Step::Map { index, device_writes, buffers } => {
                // Device-readable buffers in the first quarter, writable
                // ones in the second: never the second half.
                let (access, start) =
                    if device_writes { (DeviceAccess::Write, QUARTER) } else { (DeviceAccess::Read, 0) };
                let buffers = buffers
                    .into_iter()
                    .take(40)
                    .map(|(at, len)| {
                        let at = u64::from(at) % QUARTER;
                        let len = (u64::from(len) % (QUARTER - at)).max(1) as u32;
                        (GuestAddress(start + at), len)
                    })
                    .collect();
                if let Ok(window) = Window::new(client.clone(), None, buffers, access, GRANULE) {
                    windows.map(u32::from(index) % (WINDOWS + 1), window);
                }
            }
            Step::Unmap { index } => windows.unmap(u32::from(index) % (WINDOWS + 1)),
        }
    }
    let mut readable = vec![0u8; QUARTER as usize];
    client.read_slice(&mut readable, GuestAddress(0)).expect("read");
    assert!(readable.iter().all(|b| *b == PATTERN), "the device wrote into a device-readable window");
    let mut unmapped = vec![0u8; 2 * QUARTER as usize];
    client.read_slice(&mut unmapped, GuestAddress(2 * QUARTER)).expect("read");
    assert!(unmapped.iter().all(|b| *b == 0), "the device reached client memory no window mapped");
});
