//! `reflector`: the trusted host daemon that serves vhost-user block devices
//! whose drivers run isolated in driver VMs (see DESIGN.md).
//!
//! Trust boundaries are modules: `blk::marshal` is the only code that
//! touches client memory; `driver_answers` is the only code that judges what
//! a driver VM says; `hw` holds the (simulated) hardware a driver drives.
//!
//! What it is not yet: it does not restart a failed driver VM (a driver
//! fault fails the device's requests with an I/O error, never a hang), and
//! it serves no net devices.
#![deny(missing_docs)]

pub mod blk;
pub mod channel;
pub mod config;
pub mod driver_answers;
pub mod hw;
pub mod serve;
pub mod shm;
pub mod supervisor;
