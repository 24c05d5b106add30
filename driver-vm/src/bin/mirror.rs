//! `mirror`: copies window `in` into window `out` (up to the smaller size),
//! then exits 0. Tests use it to check that windows map files at their
//! addresses, that guest writes reach the file, and read-only mappings.
#![no_std]
#![cfg_attr(not(test), no_main)]

use driver_vm::kernel::device::Window;
use driver_vm::{println, Driver, Error, Kernel};

struct Mirror {
    input: Window,
    output: Window,
}

impl Driver for Mirror {
    const NAME: &'static str = "mirror";

    fn probe(kernel: &Kernel) -> Result<Self, Error> {
        Ok(Mirror {
            input: kernel.window("in").ok_or(Error::MissingWindow("in"))?,
            output: kernel.window("out").ok_or(Error::MissingWindow("out"))?,
        })
    }

    fn run(self, _kernel: &Kernel) -> Result<u32, Error> {
        let len = self.input.size().min(self.output.size()) as usize;
        self.output.as_mut_slice()[..len].copy_from_slice(&self.input.as_slice()[..len]);
        println!("mirror: copied {len} bytes from {:#x} to {:#x}", self.input.addr(), self.output.addr());
        Ok(0)
    }
}

driver_vm::driver_main!(Mirror);
