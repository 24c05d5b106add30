//! The block path: a vhost-user-blk device served through a driver VM.
//!
//! - `marshal`: the only code that reads or writes client memory;
//! - `inflight`: the reflector's table of requests handed to a driver VM;
//! - `read_back`: which parts of a write are read back from the medium;
//! - `device`: the block kind of `crate::device` (intake, marshaling into
//!   the channel, what recovery means for requests: replay, poison).

pub mod device;
pub mod inflight;
pub mod marshal;
pub mod read_back;
