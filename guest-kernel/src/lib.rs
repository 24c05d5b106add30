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
//!
//! Two builds of the same sources: **isolated** (the `driver_vm_isolated`
//! cfg, set by `driver-vm/isolated.toml`): the bare-metal kernel above, in
//! a driver VM; and **hosted** (without it): the same API as a Linux process
//! ([`hosted`]), where windows are mappings of the reflector's descriptors,
//! doorbells and interrupt lines eventfds. Hosted is for development (a
//! debugger, `println!`, unit tests with fake devices); it isolates nothing.
#![no_std]
#![deny(missing_docs)]

extern crate alloc;
#[cfg(not(driver_vm_isolated))]
extern crate std;

#[cfg(driver_vm_isolated)]
pub mod arch;
#[cfg(not(driver_vm_isolated))]
#[path = "hosted/arch.rs"]
pub mod arch;
pub mod boot;
pub mod console;
pub mod device;
#[cfg(driver_vm_isolated)]
mod heap;
#[cfg(not(driver_vm_isolated))]
pub mod hosted;
#[cfg(driver_vm_isolated)]
mod panic;
pub mod time;

pub use boot::Kernel;
pub use guest_abi as abi;

/// Ends the VM with `code` as its exit code.
#[cfg(driver_vm_isolated)]
pub fn exit(code: u32) -> ! {
    arch::outl(abi::port::EXIT, code);
    // The vmm never resumes a guest after an exit hypercall.
    loop {
        core::hint::spin_loop();
    }
}

/// Ends the process with `code` as its exit status (hosted).
#[cfg(not(driver_vm_isolated))]
pub fn exit(code: u32) -> ! {
    std::process::exit(code as i32)
}

/// Names the image's entry point: `fn(&Kernel) -> u32`, whose return value
/// becomes the process's exit status (hosted: a C `main` that takes its
/// resources from the command line, see [`hosted`]; none in unit tests).
#[cfg(not(driver_vm_isolated))]
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        #[cfg(not(test))]
        #[no_mangle]
        extern "C" fn main(_argc: i32, _argv: *const *const u8) -> i32 {
            $crate::hosted::start($main)
        }
        // Unit tests have the test harness's main: the entry point is
        // still used (and type-checked).
        #[cfg(test)]
        const _: fn(&$crate::Kernel) -> u32 = $main;
    };
}

/// Names the image's entry point: `fn(&Kernel) -> u32`, whose return value
/// becomes the VM's exit code.
#[cfg(driver_vm_isolated)]
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
