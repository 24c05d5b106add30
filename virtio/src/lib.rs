//! `virtio`: virtio device definitions shared by the reflector and the
//! drivers (request layouts, feature bits, status codes).
//!
//! Empty for now: it fills in with the block path, the first user of it.
#![no_std]
#![deny(missing_docs)]
