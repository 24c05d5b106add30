//! `null`: a block driver without a device. Every request succeeds at once
//! (a read returns whatever its bounce slot holds): the smallest driver.
#![no_std]
#![cfg_attr(not(test), no_main)]

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

#[cfg(test)]
mod tests {
    extern crate std;
    use driver_vm::kernel::abi::channel::status;
    use driver_vm::testing::{Bench, Completion};
    use std::vec::Vec;

    use super::Null;

    #[test]
    fn every_request_succeeds_at_once_with_its_length() {
        let mut bench = Bench::new();
        let mut null = bench.start::<Null>().unwrap();
        let write = bench.write(8, &[0x5a; 4096]);
        let read = bench.read(0, 512);
        let flush = bench.flush();
        null.drain().unwrap();
        assert_eq!(
            bench.completions(),
            [(write, 4096), (read, 512), (flush, 0)].map(|(id, len)| Completion { id, status: status::OK, len })
        );
    }

    #[test]
    fn it_serves_a_full_ring_and_then_the_next_one() {
        let mut bench = Bench::new();
        let mut null = bench.start::<Null>().unwrap();
        for round in 0..3 {
            let ids: Vec<u64> = (0..128).map(|i| bench.read(i, 512)).collect();
            null.drain().unwrap();
            let done: Vec<u64> = bench.completions().iter().map(|c| c.id).collect();
            assert_eq!(done, ids, "round {round}");
        }
    }
}
