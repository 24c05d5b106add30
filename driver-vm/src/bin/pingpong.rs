//! `pingpong`: rings doorbell 0, waits for interrupt line 0, N times
//! (command line `N`, default 10), then exits 0. Tests use it to check that
//! doorbells (ioeventfd) and interrupt lines (eventfds, `WAIT_LINES`) reach the guest and its
//! supervisor without the vmm.
#![no_std]
#![cfg_attr(not(test), no_main)]

use driver_vm::kernel::device::{Doorbell, InterruptLine};
use driver_vm::{println, Driver, Error, Kernel};

struct PingPong {
    rounds: u32,
    doorbell: Doorbell,
    interrupt: InterruptLine,
}

impl Driver for PingPong {
    const NAME: &'static str = "pingpong";

    fn probe(kernel: &Kernel) -> Result<Self, Error> {
        let rounds = match kernel.cmdline().trim() {
            "" => 10,
            text => text.parse().map_err(|_| Error::BadCommandLine("expected a number of rounds"))?,
        };
        Ok(PingPong {
            rounds,
            doorbell: kernel.doorbell(0).ok_or(Error::MissingDoorbell(0))?,
            interrupt: kernel.interrupt_line(0).ok_or(Error::MissingInterrupt(0))?,
        })
    }

    fn run(self, _kernel: &Kernel) -> Result<u32, Error> {
        for round in 1..=self.rounds {
            self.doorbell.ring(round.into());
            self.interrupt.wait();
        }
        println!("pingpong: {} rounds", self.rounds);
        Ok(0)
    }
}

driver_vm::driver_main!(PingPong);
