//! `null`: a block driver without a device. Every request succeeds at once
//! (a read returns whatever its bounce slot holds): the smallest driver.
#![no_std]
#![no_main]

use driver_vm::channel::{Channel, ChannelDriver, Device};
use driver_vm::kernel::abi::channel::{status, RequestEntry};
use driver_vm::{Error, Kernel};

struct Null;

impl ChannelDriver for Null {
    const NAME: &'static str = "null";
    fn probe(_: &Kernel, _: &Channel) -> Result<Self, Error> {
        Ok(Null)
    }
}

impl Device for Null {
    fn submit(&mut self, channel: &mut Channel, request: RequestEntry) {
        channel.complete(request.id, status::OK, request.len);
    }
}

driver_vm::channel_driver_main!(Null);
