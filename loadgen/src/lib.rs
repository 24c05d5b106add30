//! `loadgen`: a fast vhost-user-blk frontend (the side QEMU normally plays) that drives any
//! vhost-user-blk backend with virtio-blk requests and measures it.
//!
//! - [`session`]: the vhost-user control connection (negotiation, config, memory, vring setup),
//!   every exchange bounded by a timeout.
//! - [`vring`]: the driver side of a split virtqueue over shared memory.
//! - [`device`]: request slots, submission with notification suppression, completion, and a
//!   bounded poll-then-sleep wait.
//! - [`job`]: workloads (random/sequential, read/write), verification and measurements.
//! - [`malformed`]: the malformed-request probe (`blk-load --malformed`).
//! - [`pattern`]: self-describing verification patterns.
//! - [`stats`]: latency histogram.

pub mod blk;
pub mod device;
pub mod error;
pub mod job;
pub mod malformed;
pub mod mem;
pub mod pattern;
pub mod session;
pub mod stats;
pub mod vring;

pub use device::{BlkDevice, DeviceOptions};
pub use error::{Error, Result};
pub use job::{JobKind, JobResult, JobSpec, Region, Runner};
