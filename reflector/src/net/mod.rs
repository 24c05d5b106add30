//! The net path: a vhost-user-net device served through a driver VM and a
//! simulated network card.
//!
//! - `marshal`: the only code that reads or writes client memory for net;
//! - `slots`: which bounce slot carries which frame;
//! - `device`: the vhost-user backend tying them to the channel, and its
//!   recovery (policy in `crate::recovery`).

pub mod device;
pub mod marshal;
pub mod slots;
