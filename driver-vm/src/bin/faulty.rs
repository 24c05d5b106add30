//! `faulty`: fails on purpose, in the way its command line names, so that
//! tests can check how each failure is reported.
//!
//! - `panic`: panics with a message.
//! - `page-fault`: reads an address outside its memory.
//! - `illegal`: executes an invalid instruction.
//! - `triple-fault`: clears its IDT, then faults.
//! - `hang`: spins forever.
//! - `write-window`: writes to its first window (a fault if read-only).
//! - `exit=N`: exits with code N.
#![no_std]
#![no_main]

use driver_vm::{Driver, Error, Kernel};

/// Far outside any RAM or window the vmm accepts (its limit is 2^39), so
/// never mapped.
const UNMAPPED_ADDRESS: u64 = 0x7f00_dead_0000;

enum Failure {
    Panic,
    PageFault,
    Illegal,
    TripleFault,
    Hang,
    WriteWindow,
    Exit(u32),
}

struct Faulty {
    failure: Failure,
}

impl Driver for Faulty {
    const NAME: &'static str = "faulty";

    fn probe(kernel: &Kernel) -> Result<Self, Error> {
        let failure = match kernel.cmdline().trim() {
            "panic" => Failure::Panic,
            "page-fault" => Failure::PageFault,
            "illegal" => Failure::Illegal,
            "triple-fault" => Failure::TripleFault,
            "hang" => Failure::Hang,
            "write-window" => Failure::WriteWindow,
            other => match other.strip_prefix("exit=").and_then(|code| code.parse().ok()) {
                Some(code) => Failure::Exit(code),
                None => {
                    return Err(Error::BadCommandLine(
                        "expected panic, page-fault, illegal, triple-fault, hang, write-window or exit=N",
                    ))
                }
            },
        };
        Ok(Faulty { failure })
    }

    fn run(self, kernel: &Kernel) -> Result<u32, Error> {
        match self.failure {
            Failure::Panic => panic!("faulty driver: panic requested"),
            Failure::PageFault => {
                // SAFETY: deliberately invalid; the page fault ends the VM.
                let _ = unsafe { (UNMAPPED_ADDRESS as *const u64).read_volatile() };
            }
            // SAFETY: ud2 raises #UD, which ends the VM.
            Failure::Illegal => unsafe { core::arch::asm!("ud2") },
            Failure::TripleFault => triple_fault(),
            Failure::Hang => loop {
                core::hint::spin_loop();
            },
            Failure::WriteWindow => {
                let window = kernel.windows().next().ok_or(Error::MissingWindow("any"))?;
                // SAFETY: the window is mapped for the VM's lifetime; if it
                // is read-only the write faults, which is the point.
                unsafe { window.as_ptr().write_volatile(0x5a) };
                return Ok(0);
            }
            Failure::Exit(code) => return Ok(code),
        };
        Err(Error::Device("the requested failure did not happen"))
    }
}

/// Zeroes the IDT (ring 3 can read its address with `sidt` and the vmm maps
/// it like all RAM), then faults: the #UD finds no gate, nor does the double
/// fault that follows, so the CPU shuts down.
fn triple_fault() {
    let mut idtr = [0u8; 10];
    // SAFETY: sidt stores 10 bytes into `idtr`.
    unsafe { core::arch::asm!("sidt [{}]", in(reg) idtr.as_mut_ptr(), options(nostack)) };
    let limit = u16::from_le_bytes([idtr[0], idtr[1]]) as usize;
    let mut base = [0u8; 8];
    base.copy_from_slice(&idtr[2..10]);
    let base = u64::from_le_bytes(base) as *mut u8;
    for i in 0..=limit {
        // SAFETY: the IDT lies in mapped, writable guest RAM.
        unsafe { base.add(i).write_volatile(0) };
    }
    // SAFETY: raises #UD with no handler left.
    unsafe { core::arch::asm!("ud2") };
}

driver_vm::driver_main!(Faulty);
