//! `virtio`: virtio device definitions shared by the device side (the
//! reflector) and the driver side (the project's frontend, `blk-load`), so
//! that both read the same layouts. Numbers come from `virtio-bindings`
//! (rust-vmm), typed for use.
//!
//! What it is not: a device or a driver; no I/O happens here.
#![deny(missing_docs)]

pub mod blk;
pub mod net;
