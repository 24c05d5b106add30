//! `reflector`: the trusted host daemon that serves vhost-user block devices
//! whose drivers run isolated in driver VMs (see DESIGN.md).
//!
//! Trust boundaries are modules: `blk::marshal` is the only code that
//! touches client memory; `driver_answers` is the only code that judges what
//! a driver VM says; `hw` holds the (simulated) hardware a driver drives.
//!
//! A driver VM that exits, hangs or breaks the channel protocol is replaced
//! and its requests replayed (`blk::recovery`, `blk::device`); the control
//! socket (`control`) reports state and counters, and `chaos` exercises
//! recovery under load. What it is not yet: it serves no net devices.
#![deny(missing_docs)]

pub mod blk;
pub mod channel;
pub mod chaos;
pub mod config;
pub mod control;
pub mod driver_answers;
pub mod hw;
pub mod serve;
pub mod shm;
pub mod supervisor;
