//! `faulty`: fails on purpose, in the way its command line names, so that
//! tests can check how each failure is reported.
//!
//! - `panic`: panics with a message.
//! - `page-fault`: reads an address outside its memory.
//! - `illegal`: executes an invalid instruction.
//! - `write-idt`: writes to its IDT (supervisor-only: a page fault).
//! - `write-code`: writes to its own code (read-only: a page fault).
//! - `execute-stack`: jumps to code it wrote on its stack (not executable:
//!   a page fault).
//! - `stack-overflow`: recurses without end (the guard page below the
//!   stack: reported as a stack overflow).
//! - `hang`: spins forever (after printing `faulty: hanging`).
//! - `write-window`: writes to its first window (a fault if read-only).
//! - `hog`: allocates without bound (its RAM is its cap: the allocation
//!   that no longer fits panics, reported as out of memory).
//! - `halt`: executes `hlt` (privileged: a general-protection fault; the
//!   guest sleeps with a hypercall, never by halting).
//! - `poke-pic`: writes the PIC's command port (a driver VM has no
//!   interrupt controller: an invalid access).
//! - `ready-flood`: says it is ready again and again.
//! - `console-flood`: prints console lines without end.
//! - `exit=N`: exits with code N.
//!
//! Tests find the planted bugs' lines by the `planted:` comments.
#![no_std]
#![cfg_attr(not(test), no_main)]

extern crate alloc;

use driver_vm::{Driver, Error, Kernel};

/// Far outside any RAM or window the vmm accepts (its limit is 2^39), so
/// never mapped.
const UNMAPPED_ADDRESS: u64 = 0x7f00_dead_0000;

enum Failure {
    Panic,
    PageFault,
    Illegal,
    WriteIdt,
    WriteCode,
    ExecuteStack,
    StackOverflow,
    Hang,
    WriteWindow,
    Hog,
    Halt,
    PokePic,
    ReadyFlood,
    ConsoleFlood,
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
            "write-idt" => Failure::WriteIdt,
            "write-code" => Failure::WriteCode,
            "execute-stack" => Failure::ExecuteStack,
            "stack-overflow" => Failure::StackOverflow,
            "hang" => Failure::Hang,
            "write-window" => Failure::WriteWindow,
            "hog" => Failure::Hog,
            "halt" => Failure::Halt,
            "poke-pic" => Failure::PokePic,
            "ready-flood" => Failure::ReadyFlood,
            "console-flood" => Failure::ConsoleFlood,
            other => match other.strip_prefix("exit=").and_then(|code| code.parse().ok()) {
                Some(code) => Failure::Exit(code),
                None => {
                    return Err(Error::BadCommandLine(
                        "expected panic, page-fault, illegal, write-idt, write-code, execute-stack, stack-overflow, hang, write-window, hog, halt, poke-pic, ready-flood, console-flood or exit=N",
                    ))
                }
            },
        };
        Ok(Faulty { failure })
    }

    fn run(self, kernel: &Kernel) -> Result<u32, Error> {
        match self.failure {
            Failure::Panic => panic!("faulty driver: panic requested"), // planted: panic
            Failure::PageFault => {
                // SAFETY: deliberately invalid; the page fault ends the VM.
                let _ = unsafe { (UNMAPPED_ADDRESS as *const u64).read_volatile() };
                // planted: page-fault
            }
            // SAFETY: ud2 raises #UD, which ends the VM.
            Failure::Illegal => unsafe { core::arch::asm!("ud2") },
            Failure::WriteIdt => write_idt(),
            Failure::WriteCode => write_code(),
            Failure::ExecuteStack => execute_stack(),
            Failure::StackOverflow => {
                let depth = recurse(0); // planted: stack-overflow caller
                driver_vm::println!("faulty: {depth}");
            }
            Failure::Hang => hang(),
            Failure::WriteWindow => {
                let window = kernel.windows().next().ok_or(Error::MissingWindow("any"))?;
                // SAFETY: the window is mapped for the VM's lifetime; if it
                // is read-only the write faults, which is the point.
                unsafe { window.as_ptr().write_volatile(0x5a) };
                return Ok(0);
            }
            Failure::Hog => hog(),
            // SAFETY: `hlt` in ring 3 raises #GP, which ends the VM.
            Failure::Halt => unsafe { core::arch::asm!("hlt", options(nostack, nomem)) },
            // SAFETY: a port write with no memory effect; the vmm ends the
            // VM on it (no interrupt controller answers it in the kernel).
            Failure::PokePic => unsafe {
                core::arch::asm!("out dx, al", in("dx") 0x20u16, in("al") 0x20u8, options(nostack, nomem))
            },
            Failure::ReadyFlood => ready_flood(),
            Failure::ConsoleFlood => console_flood(),
            Failure::Exit(code) => return Ok(code),
        };
        Err(Error::Device("the requested failure did not happen"))
    }
}

/// Writes to the IDT (ring 3 can read its address with `sidt`): the page
/// is supervisor-only, so the write faults instead of corrupting the
/// handlers that report faults.
fn write_idt() {
    let mut idtr = [0u8; 10];
    // SAFETY: sidt stores 10 bytes into `idtr`.
    unsafe { core::arch::asm!("sidt [{}]", in(reg) idtr.as_mut_ptr(), options(nostack)) };
    let mut base = [0u8; 8];
    base.copy_from_slice(&idtr[2..10]);
    let base = u64::from_le_bytes(base) as *mut u8;
    // SAFETY: deliberately forbidden; the page fault ends the VM.
    unsafe { base.write_volatile(0) }; // planted: write-idt
}

/// Writes over this very function's code: read-only, so it faults.
fn write_code() {
    let code = write_code as *const () as *mut u8;
    // SAFETY: deliberately forbidden; the page fault ends the VM.
    unsafe { code.write_volatile(0xc3) }; // planted: write-code
}

/// Writes a `ret` on the stack and calls it: the stack is not executable.
fn execute_stack() {
    let code = [0xc3u8; 16];
    // SAFETY: deliberately forbidden: the instruction fetch faults.
    let function: extern "C" fn() = unsafe { core::mem::transmute(code.as_ptr()) };
    function(); // planted: execute-stack
}

/// Recurses without end: each frame holds a buffer the optimiser cannot
/// drop, and the call is not a tail call.
#[inline(never)]
#[allow(unconditional_recursion)]
fn recurse(depth: u64) -> u64 {
    // planted: stack-overflow begins
    let mut frame = [depth as u8; 512];
    core::hint::black_box(&mut frame);
    let below = recurse(depth + 1);
    below + u64::from(core::hint::black_box(frame)[7])
    // planted: stack-overflow ends
}

/// Spins forever, where a supervisor's report must find it.
#[inline(never)]
fn hang() -> ! {
    driver_vm::println!("faulty: hanging"); // planted: hang begins
    loop {
        core::hint::spin_loop(); // planted: hang loop
    }
}

driver_vm::driver_main!(Faulty);

/// Says it is ready again and again, for ever (a supervisor that waited on
/// each one would be held).
fn ready_flood() -> ! {
    loop {
        // SAFETY: a port write with no memory effect (the vmm's READY port).
        unsafe {
            core::arch::asm!("out dx, al", in("dx") driver_vm::kernel::abi::port::READY, in("al") 1u8, options(nostack, nomem))
        };
    }
}

/// Prints console lines without end.
fn console_flood() -> ! {
    let mut line = 0u64;
    loop {
        driver_vm::println!("faulty: flooding the console, line {line}");
        line += 1;
    }
}

/// Allocates 256 KiB chunks, zeroed (so touched), and keeps them all.
fn hog() -> ! {
    let mut held = alloc::vec::Vec::new();
    loop {
        held.push(alloc::vec![0u8; 256 * 1024]); // planted: hog
    }
}
