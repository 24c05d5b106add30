//! The block path: a vhost-user-blk device served through a driver VM.
//!
//! - `marshal`: the only code that reads or writes client memory;
//! - `inflight`: the reflector's table of requests handed to a driver VM;
//! - `device`: the vhost-user backend tying them to the channel, and its
//!   recovery (policy in `crate::recovery`).

pub mod device;
pub mod inflight;
pub mod marshal;
