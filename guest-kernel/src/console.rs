//! Console output on COM1, which the vmm prefixes with the VM's name
//! (hosted: standard output).

use core::fmt;

/// Writes raw bytes to the console: through the message buffer, a buffer
/// at a time, one exit each (`port::CONSOLE_LINE`).
#[cfg(driver_vm_isolated)]
pub fn write_bytes(bytes: &[u8]) {
    use guest_abi::{port, PANIC_BUF_GPA, PANIC_BUF_LEN};
    for chunk in bytes.chunks(PANIC_BUF_LEN) {
        // SAFETY: the vmm maps PANIC_BUF_LEN writable bytes at PANIC_BUF_GPA
        // for the guest's messages, and a chunk is at most that long. Only
        // one vCPU runs and no interrupt handler writes there, so nothing
        // else uses the buffer until the `out` below has been handled.
        unsafe { core::ptr::copy_nonoverlapping(chunk.as_ptr(), PANIC_BUF_GPA as *mut u8, chunk.len()) };
        crate::arch::outl(port::CONSOLE_LINE, chunk.len() as u32);
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

/// Bytes gathered before one write: a formatted line is several
/// `write_str` calls (each literal piece and each argument), and each write
/// is an exit to the vmm (about 66 us here), so a line goes out whole.
const LINE: usize = 256;

/// Gathers formatted output into whole writes of up to [`LINE`] bytes.
struct Buffered {
    bytes: [u8; LINE],
    len: usize,
}

impl Buffered {
    fn flush(&mut self) {
        if self.len > 0 {
            write_bytes(&self.bytes[..self.len]);
            self.len = 0;
        }
    }
}

impl fmt::Write for Buffered {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s.as_bytes();
        while !rest.is_empty() {
            if self.len == LINE {
                self.flush();
            }
            let take = rest.len().min(LINE - self.len);
            self.bytes[self.len..self.len + take].copy_from_slice(&rest[..take]);
            self.len += take;
            rest = &rest[take..];
        }
        Ok(())
    }
}

#[doc(hidden)]
pub fn _print(args: fmt::Arguments) {
    let mut line = Buffered { bytes: [0; LINE], len: 0 };
    let _ = fmt::write(&mut line, args);
    line.flush();
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
