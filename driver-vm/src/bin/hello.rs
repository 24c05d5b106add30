//! `hello`: prints a greeting and its command line, exits 0.
#![no_std]
#![no_main]

use driver_vm::{println, Driver, Error, Kernel};

struct Hello;

impl Driver for Hello {
    const NAME: &'static str = "hello";

    fn probe(_kernel: &Kernel) -> Result<Self, Error> {
        Ok(Hello)
    }

    fn run(self, kernel: &Kernel) -> Result<u32, Error> {
        println!("hello from a driver VM ({} MiB RAM)", kernel.ram_size() >> 20);
        if !kernel.cmdline().is_empty() {
            println!("command line: {}", kernel.cmdline());
        }
        Ok(0)
    }
}

driver_vm::driver_main!(Hello);
