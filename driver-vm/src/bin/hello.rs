//! `hello`: prints a greeting and its command line, shows that the heap and
//! ring-3 floating point (SSE) work, exits 0.
#![no_std]
#![cfg_attr(not(test), no_main)]

extern crate alloc;

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;

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
        // The heap: a vector of 64 KiB, summed.
        let squares: Vec<u64> = (0..8192u64).map(|i| i * i).collect();
        let mut line = String::new();
        let _ = write!(line, "heap: {} values, sum {}", squares.len(), squares.iter().sum::<u64>());
        println!("{line}");
        // Floating point formatting runs SSE code in ring 3.
        let third = core::hint::black_box(1.0f64) / 3.0;
        println!("sse: 1/3 = {third:.6}");
        Ok(0)
    }
}

driver_vm::driver_main!(Hello);
