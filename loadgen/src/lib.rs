//! `loadgen`: fast vhost-user frontends (the side QEMU normally plays): `blk-load` drives any
//! vhost-user-blk backend with virtio-blk requests and measures it; `net-load` sends Ethernet
//! frames through vhost-user-net backends and measures rate, loss, integrity and latency.
//!
//! - [`session`]: the vhost-user control connection (negotiation, config, memory, vring setup),
//!   every exchange bounded by a timeout.
//! - [`vring`]: the driver side of a split virtqueue over shared memory.
//! - [`device`]: request slots, submission with notification suppression, completion, and a
//!   bounded poll-then-sleep wait.
//! - [`job`]: workloads (random/sequential, read/write), verification and measurements.
//! - [`malformed`]: the malformed-request probe (`blk-load --malformed`).
//! - [`hostile`]: hostile-client actions a backend must survive (`blk-load --hostile`).
//! - [`pattern`]: self-describing verification patterns.
//! - [`stats`]: latency histogram.
//! - [`net`]: the virtio-net frontend of `net-load` (throughput, loss, integrity, latency).

pub mod blk;
pub mod device;
pub mod error;
pub mod hostile;
pub mod job;
pub mod malformed;
pub mod mem;
pub mod net;
pub mod pattern;
pub mod session;
pub mod stats;
pub mod vring;

pub use device::{BlkDevice, DeviceOptions};
pub use error::{Error, Result};
pub use job::{JobKind, JobResult, JobSpec, Region, Runner};
