//! Console output on COM1, which the vmm prefixes with the VM's name
//! (hosted: standard output).

use core::fmt;

/// Longest chunk sent in one exit: the vmm receives `rep outsb` data a page
/// at a time.
#[cfg(driver_vm_isolated)]
const CHUNK: usize = 4096;

/// Writes raw bytes to the console.
#[cfg(driver_vm_isolated)]
pub fn write_bytes(bytes: &[u8]) {
    for chunk in bytes.chunks(CHUNK) {
        crate::arch::outsb(guest_abi::port::CONSOLE, chunk);
    }
}

/// Writes raw bytes to the console.
#[cfg(not(driver_vm_isolated))]
pub fn write_bytes(bytes: &[u8]) {
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(bytes);
}

/// The console as a `fmt::Write` sink.
pub struct Console;

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_bytes(s.as_bytes());
        Ok(())
    }
}

#[doc(hidden)]
pub fn _print(args: fmt::Arguments) {
    let _ = fmt::write(&mut Console, args);
}

/// Prints to the console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::_print(format_args!($($arg)*)) };
}

/// Prints a line to the console.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::console::_print(format_args!("{}\n", format_args!($($arg)*))) };
}
