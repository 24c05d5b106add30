//! `vmm`: a small KVM VMM that boots one driver VM image and reports how it
//! ended.
//!
//! A driver VM is given RAM, the windows of its device (files mapped at
//! guest physical addresses), doorbells (KVM ioeventfd) and interrupt lines
//! (eventfds), and nothing else. Its vCPU starts in guest ring 3 (see
//! DESIGN.md for why). The vmm is on the data path for console output, the
//! guest's final hypercall and its sleep: doorbells reach the supervisor
//! directly through KVM, and a guest with nothing to do asks its vmm to wait
//! on its interrupt lines (`port::WAIT_LINES`; no interrupt is delivered
//! through the emulated ring 0, and the VM has no interrupt controller).
//!
//! What it is not: a general-purpose VMM. There are no emulated devices, no
//! firmware, no SMP; an image must be built with `guest-kernel`.
//!
//! What it trusts: nothing the guest writes. Exits, hypercall arguments,
//! panic messages and exception frames are read with bounds checks and
//! reported as untrusted data.
#![deny(missing_docs)]

pub mod address_space;
pub mod bench;
pub mod config;
pub mod console;
pub mod error;
pub mod guest_ending;
pub mod hosted;
pub mod image;
pub mod memory;
pub mod new_driver;
pub mod outcome;
pub mod runner;
pub mod seccomp;
pub mod symbols;
pub mod vcpu;
pub mod vm;
pub mod x86;

pub use config::VmConfig;
pub use error::{Error, Result};
pub use image::Image;
pub use outcome::{Outcome, Report};
pub use vm::Vm;
