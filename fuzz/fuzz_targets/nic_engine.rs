//! The simulated network card's engine against a hostile driver and a
//! hostile wire: the input writes register words and ring memory (the whole
//! window), steps the engine, and delivers frames of any length. Nothing
//! may panic; frames sent are within the size limits; DMA stays inside its
//! region (guard bytes around it stay untouched).
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};

use arbitrary::Arbitrary;
use guest_abi::nic;
use libfuzzer_sys::fuzz_target;
use reflector::hw::sim_nic::EngineHarness;
use reflector::hw::DmaRegion;
use reflector::shm::SharedMemory;

#[derive(Arbitrary, Debug)]
enum Step {
    /// A 32-bit word anywhere in the window (registers and rings).
    Word {
        offset: u16,
        value: u32,
    },
    Step,
    Receive(Vec<u8>),
    Quiesce(bool),
}

const DMA_GPA: u64 = 0x4000_0000;
const GUARD: usize = 4096;
const DMA_LEN: usize = 64 << 10;

static MEMORY: OnceLock<Mutex<(Arc<SharedMemory>, Arc<SharedMemory>)>> = OnceLock::new();

fuzz_target!(|steps: Vec<Step>| {
    let memory = MEMORY.get_or_init(|| {
        Mutex::new((
            Arc::new(SharedMemory::new("regs", nic::WINDOW_SIZE).expect("regs")),
            Arc::new(SharedMemory::new("dma", GUARD + DMA_LEN + GUARD).expect("dma")),
        ))
    });
    let memory = memory.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let (regs, dma) = (&memory.0, &memory.1);
    for offset in (0..nic::WINDOW_SIZE).step_by(4) {
        regs.atomic_u32(offset).store(0, std::sync::atomic::Ordering::SeqCst);
    }
    let region = DmaRegion { memory: dma.clone(), offset: GUARD, len: DMA_LEN, gpa: DMA_GPA };
    let mut engine = EngineHarness::new(regs.clone(), region);
    for step in steps.into_iter().take(128) {
        match step {
            Step::Word { offset, value } => {
                let offset = usize::from(offset) * 4 % nic::WINDOW_SIZE;
                regs.atomic_u32(offset).store(value, std::sync::atomic::Ordering::SeqCst);
            }
            Step::Step => {
                let (frames, _) = engine.step();
                for frame in frames {
                    assert!((nic::MIN_FRAME as usize..=nic::MAX_FRAME as usize).contains(&frame.len()));
                }
            }
            Step::Receive(frame) => engine.receive(&frame),
            Step::Quiesce(on) => engine.set_quiesced(on),
        }
    }
    let mut guards = [0u8; GUARD];
    dma.slice(0, GUARD).expect("guard").copy_to(&mut guards[..]);
    assert!(guards.iter().all(|b| *b == 0), "DMA below its region");
    dma.slice(GUARD + DMA_LEN, GUARD).expect("guard").copy_to(&mut guards[..]);
    assert!(guards.iter().all(|b| *b == 0), "DMA above its region");
});
