//! `guest-kernel`: the freestanding kernel every driver VM image links.
//!
//! It runs entirely in guest ring 3 (ring 0 is only entered by the interrupt
//! stubs in [`arch`]) and gives a driver what it needs and nothing more: the
//! boot information the vmm wrote ([`Kernel`]), a console, TSC time, a heap,
//! access to its device windows, doorbells and interrupt lines, and a panic
//! handler that reports the message to the vmm.
//!
//! What it is not: a general operating system. There are no processes, no
//! scheduler, no filesystem; one driver runs on one vCPU. Nothing here is
//! trusted by the host: the vmm and the reflector check everything that
//! comes out of a driver VM.
//!
//! An image is a `#![no_std] #![no_main]` binary that links this crate and
//! names its entry point with [`entry!`].
#![no_std]
#![deny(missing_docs)]

extern crate alloc;

pub mod arch;
pub mod boot;
pub mod console;
pub mod device;
mod heap;
mod panic;
pub mod time;

pub use boot::Kernel;
pub use guest_abi as abi;

/// Ends the VM with `code` as its exit code.
pub fn exit(code: u32) -> ! {
    arch::outl(abi::port::EXIT, code);
    // The vmm never resumes a guest after an exit hypercall.
    loop {
        core::hint::spin_loop();
    }
}

/// Names the image's entry point: `fn(&Kernel) -> u32`, whose return value
/// becomes the VM's exit code.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        #[no_mangle]
        extern "Rust" fn __driver_vm_main(kernel: &$crate::Kernel) -> u32 {
            let main: fn(&$crate::Kernel) -> u32 = $main;
            main(kernel)
        }
    };
}
