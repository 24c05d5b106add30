//! Console output on COM1, which the vmm prefixes with the VM's name.

use core::fmt;

use guest_abi::port;

use crate::arch;

/// Longest chunk sent in one exit: the vmm receives `rep outsb` data a page
/// at a time.
const CHUNK: usize = 4096;

/// Writes raw bytes to the console.
pub fn write_bytes(bytes: &[u8]) {
    for chunk in bytes.chunks(CHUNK) {
        arch::outsb(port::CONSOLE, chunk);
    }
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
