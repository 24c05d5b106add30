//! The simulated storage controller's engine against a hostile driver: the
//! input writes register words and submission-queue commands and steps the
//! engine, quiescing it at times. Nothing may panic, and DMA never leaves
//! its region (the DMA region is a window into a larger mapping whose
//! guard bytes must stay untouched).
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};

use driver_vms_fuzz::{clear_storage_window, memfd_medium, storage_step, StorageStep};
use guest_abi::storage;
use libfuzzer_sys::fuzz_target;
use reflector::hw::sim_storage::EngineHarness;
use reflector::hw::DmaRegion;
use reflector::shm::SharedMemory;

const DMA_GPA: u64 = 0x4000_0000;
const GUARD: usize = 4096;
const DMA_LEN: usize = 64 << 10;

struct Rig {
    regs: Arc<SharedMemory>,
    dma: Arc<SharedMemory>,
    image: std::fs::File,
}

static RIG: OnceLock<Mutex<Rig>> = OnceLock::new();

fuzz_target!(|steps: Vec<StorageStep>| {
    let rig = RIG.get_or_init(|| {
        Mutex::new(Rig {
            regs: Arc::new(SharedMemory::new("regs", storage::WINDOW_SIZE).expect("regs")),
            dma: Arc::new(SharedMemory::new("dma", GUARD + DMA_LEN + GUARD).expect("dma")),
            image: memfd_medium(1 << 20),
        })
    });
    let rig = rig.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    clear_storage_window(&rig.regs);
    let region = DmaRegion { memory: rig.dma.clone(), offset: GUARD, len: DMA_LEN, gpa: DMA_GPA };
    let Ok(medium) = rig.image.try_clone() else { return };
    let Ok(mut engine) = EngineHarness::new(rig.regs.clone(), region, medium, false) else { return };
    for step in steps.into_iter().take(128) {
        storage_step(&mut engine, &rig.regs, step, DMA_GPA, DMA_LEN as u64 + 8192);
    }
    let mut guards = [0u8; GUARD];
    rig.dma.slice(0, GUARD).expect("guard").copy_to(&mut guards[..]);
    assert!(guards.iter().all(|b| *b == 0), "DMA below its region");
    rig.dma.slice(GUARD + DMA_LEN, GUARD).expect("guard").copy_to(&mut guards[..]);
    assert!(guards.iter().all(|b| *b == 0), "DMA above its region");
});
