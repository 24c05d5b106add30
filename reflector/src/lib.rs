//! `reflector`: the trusted host daemon that serves vhost-user block and net
//! devices whose drivers run isolated in driver VMs (see DESIGN.md).
//!
//! Trust boundaries are modules: `blk::marshal` and `net::marshal` are the
//! only code that touches client memory; `driver_answers` is the only code
//! that judges what a driver VM says; `hw` holds the (simulated) hardware a
//! driver drives: a storage controller, a network card, the switch that
//! joins cards and the TAP port that bridges a switch to the host.
//!
//! A driver VM that exits, hangs or breaks the channel protocol is replaced
//! (`recovery` decides when, `driver_vms` how, `spare_starter` starts its
//! spares off the device's worker): a block device replays the
//! requests it had (`blk::device`), a net device loses at most the frames
//! it was sending and keeps its link up (`net::device`). The control socket
//! (`control`) reports state and counters, and `chaos` exercises recovery
//! under load. What it is not: a general switch or router; net devices have
//! no offloads and one queue pair.
#![deny(missing_docs)]

pub mod blk;
pub mod channel;
pub mod chaos;
pub mod client_memory;
pub mod client_vring;
pub mod config;
pub mod connection_pace;
pub mod console_relay;
pub mod control;
pub mod device;
pub mod disk_image;
pub mod driver_answers;
pub mod driver_vms;
pub mod driver_watch;
pub mod failover;
pub mod inline_driver;
pub mod jail;
pub mod metrics;
pub mod net;
pub mod privileges;
pub mod recovery;
pub mod serve;
pub mod session;
pub mod sockets;
pub mod spare_starter;
pub mod supervisor;
pub mod token_bucket;
pub mod untrusted_text;
pub mod worker;

/// The devices driver VMs drive (the `hardware` crate).
pub use hardware as hw;
/// Shared memory regions (the `hardware` crate's).
pub use hardware::shm;
