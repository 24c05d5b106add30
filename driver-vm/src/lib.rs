//! `driver-vm`: the driver framework and the images built from it.
//!
//! A driver is a type implementing [`Driver`]: `probe` finds and
//! initialises its device from what the kernel gives it (windows, doorbells,
//! interrupt lines, command line), `run` serves until done. Each image in
//! `src/bin/` is one driver plus the [`driver_main!`] line that makes it the
//! image's entry point. Everything runs in guest ring 3.
//!
//! What it is not: trusted. The host checks everything a driver answers.
#![no_std]
#![deny(missing_docs)]

use core::fmt;

pub mod channel;
pub mod poll;
pub mod registers;
#[cfg(not(driver_vm_isolated))]
pub mod testing;

pub use guest_kernel::{self as kernel, print, println, Kernel};

/// Why a driver could not start or had to stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A window the driver needs was not given (its name).
    MissingWindow(&'static str),
    /// A doorbell the driver needs was not given (its index).
    MissingDoorbell(usize),
    /// An interrupt line the driver needs was not given (its index).
    MissingInterrupt(usize),
    /// The command line asked for something the driver does not know.
    BadCommandLine(&'static str),
    /// The device did not behave as its specification says.
    Device(&'static str),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::MissingWindow(name) => write!(f, "no window named {name:?} (vmm run --window ...,name={name})"),
            Error::MissingDoorbell(i) => write!(f, "doorbell {i} missing (vmm run --doorbell)"),
            Error::MissingInterrupt(i) => write!(f, "interrupt line {i} missing (vmm run --irq)"),
            Error::BadCommandLine(what) => write!(f, "bad command line: {what}"),
            Error::Device(what) => write!(f, "device error: {what}"),
        }
    }
}

/// What a driver implements.
pub trait Driver: Sized {
    /// Name used in console messages.
    const NAME: &'static str;

    /// Finds the device among the kernel's resources and brings it to a
    /// known state. A driver must assume the device was left in any state by
    /// a previous driver VM that died.
    fn probe(kernel: &Kernel) -> Result<Self, Error>;

    /// Serves the device. Returns the exit code when the driver has nothing
    /// left to do.
    fn run(self, kernel: &Kernel) -> Result<u32, Error>;
}

/// Probes and runs `D`; reports an error on the console and turns it into
/// the kernel's "driver failed" exit code.
pub fn run<D: Driver>(kernel: &Kernel) -> u32 {
    match D::probe(kernel).and_then(|driver| driver.run(kernel)) {
        Ok(code) => code,
        Err(error) => {
            println!("{}: {}", D::NAME, error);
            kernel::abi::exit_code::DRIVER_FAILED
        }
    }
}

/// Makes channel driver `$driver` (a [`channel::ChannelDriver`]) the
/// image's entry point.
#[macro_export]
macro_rules! channel_driver_main {
    ($driver:ty) => {
        fn __image_main(kernel: &$crate::Kernel) -> u32 {
            match $crate::channel::run_driver::<$driver>(kernel) {
                Ok(code) => code,
                Err(error) => {
                    $crate::println!("{}: {}", <$driver as $crate::channel::ChannelDriver>::NAME, error);
                    $crate::kernel::abi::exit_code::DRIVER_FAILED
                }
            }
        }
        $crate::kernel::entry!(__image_main);
    };
}

/// Makes driver `$driver` the image's entry point.
#[macro_export]
macro_rules! driver_main {
    ($driver:ty) => {
        fn __image_main(kernel: &$crate::Kernel) -> u32 {
            $crate::run::<$driver>(kernel)
        }
        $crate::kernel::entry!(__image_main);
    };
}
