//! The simulated storage controller's engine against a hostile driver: the
//! input writes register words and submission-queue commands and steps the
//! engine, quiescing it at times. Nothing may panic, and DMA never leaves
//! its region (the DMA region is a window into a larger mapping whose
//! guard bytes must stay untouched).
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};

use arbitrary::Arbitrary;
use guest_abi::storage::{self, reg, Command};
use libfuzzer_sys::fuzz_target;
use reflector::hw::sim_storage::EngineHarness;
use reflector::hw::DmaRegion;
use reflector::shm::SharedMemory;

#[derive(Arbitrary, Debug)]
enum Step {
    Register { offset: u8, value: u32 },
    Submit { at: u8, opcode: u16, cid: u16, len: u32, lba: u64, dma: u64 },
    Step,
    Quiesce(bool),
}

const DMA_GPA: u64 = 0x4000_0000;
const GUARD: usize = 4096;
const DMA_LEN: usize = 64 << 10;

struct Rig {
    regs: Arc<SharedMemory>,
    dma: Arc<SharedMemory>,
    image: std::fs::File,
}

static RIG: OnceLock<Mutex<Rig>> = OnceLock::new();

fuzz_target!(|steps: Vec<Step>| {
    let rig = RIG.get_or_init(|| {
        // A memfd: flushes cost nothing, so the fuzzer runs fast.
        // SAFETY: memfd_create with a static name; checked below.
        let fd = unsafe { libc::memfd_create(c"fuzz-medium".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create");
        // SAFETY: a fresh descriptor we own.
        let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(1 << 20).expect("sizing the medium");
        Mutex::new(Rig {
            regs: Arc::new(SharedMemory::new("regs", storage::WINDOW_SIZE).expect("regs")),
            dma: Arc::new(SharedMemory::new("dma", GUARD + DMA_LEN + GUARD).expect("dma")),
            image: file,
        })
    });
    let rig = rig.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    for offset in (0..storage::WINDOW_SIZE).step_by(4) {
        rig.regs.atomic_u32(offset).store(0, std::sync::atomic::Ordering::SeqCst);
    }
    let region = DmaRegion { memory: rig.dma.clone(), offset: GUARD, len: DMA_LEN, gpa: DMA_GPA };
    let Ok(medium) = rig.image.try_clone() else { return };
    let Ok(mut engine) = EngineHarness::new(rig.regs.clone(), region, medium, false) else { return };
    for step in steps.into_iter().take(128) {
        match step {
            Step::Register { offset, value } => {
                let offset = usize::from(offset) * 4;
                if offset + 4 <= storage::SQ_OFFSET {
                    rig.regs.atomic_u32(offset).store(value, std::sync::atomic::Ordering::SeqCst);
                }
            }
            Step::Submit { at, opcode, cid, len, lba, dma } => {
                let depth = rig.regs.atomic_u32(reg::QUEUE_DEPTH).load(std::sync::atomic::Ordering::SeqCst).max(1);
                let offset = storage::SQ_OFFSET + (u32::from(at) % depth.min(storage::MAX_QUEUE_DEPTH)) as usize * 32;
                let dma = if dma & 1 == 0 { DMA_GPA + (dma >> 1) % (DMA_LEN as u64 + 8192) } else { dma };
                rig.regs.write(
                    offset,
                    Command { opcode: opcode % 4, cid, len: len % (256 << 10), lba: lba % 4096, dma, reserved: 0 },
                );
            }
            Step::Step => {
                engine.step();
                let _ = engine.has_pending_work();
            }
            Step::Quiesce(on) => engine.set_quiesced(on),
        }
    }
    let mut guards = [0u8; GUARD];
    rig.dma.slice(0, GUARD).expect("guard").copy_to(&mut guards[..]);
    assert!(guards.iter().all(|b| *b == 0), "DMA below its region");
    rig.dma.slice(GUARD + DMA_LEN, GUARD).expect("guard").copy_to(&mut guards[..]);
    assert!(guards.iter().all(|b| *b == 0), "DMA above its region");
});
