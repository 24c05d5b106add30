//! The net path: a vhost-user-net device served through a driver VM and a
//! simulated network card.
//!
//! - `marshal`: the only code that reads or writes client memory for net;
//! - `slots`: which bounce slot carries which frame;
//! - `device`: the net kind of `crate::device` (transmit and receive
//!   paths, what recovery means for frames: lost at most once).

pub mod device;
pub mod marshal;
pub mod slots;
