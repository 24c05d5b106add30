//! Panic reporting: the message goes to the vmm, which ends the VM and
//! reports `"outcome": "panic"` with it.

use core::fmt::{self, Write};
use core::panic::PanicInfo;

use guest_abi::{port, PANIC_BUF_GPA, PANIC_BUF_LEN};

use crate::arch;

/// Writes into the panic buffer, silently truncating.
struct PanicBuffer {
    len: usize,
}

impl Write for PanicBuffer {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let take = s.len().min(PANIC_BUF_LEN - self.len);
        // SAFETY: the vmm maps PANIC_BUF_LEN bytes at PANIC_BUF_GPA for this
        // purpose, and `len + take <= PANIC_BUF_LEN`.
        unsafe { core::ptr::copy_nonoverlapping(s.as_ptr(), (PANIC_BUF_GPA as *mut u8).add(self.len), take) };
        self.len += take;
        Ok(())
    }
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    let mut buffer = PanicBuffer { len: 0 };
    let _ = write!(buffer, "{}", info.message());
    if let Some(location) = info.location() {
        let _ = write!(buffer, " at {}:{}", location.file(), location.line());
    }
    arch::outl(port::PANIC, buffer.len as u32);
    loop {
        core::hint::spin_loop();
    }
}
