//! `mute-vmm`: stands in for a vmm whose guest took it over and closed its
//! standard output (the pipe the reflector reads its report on), then runs
//! on. The reflector starts it exactly as it starts the real vmm, jail
//! included; it says on standard error that it closed the pipe, then waits
//! until its standard input (the reflector's lifeline) closes or it is
//! killed. A reflector that took the closed pipe for the vmm's end would
//! start recovering while it runs.
//!
//! Not a test by itself: `reflector/tests/jail.rs` starts it. Never
//! installed anywhere a real deployment would use it.

use std::io::Read;

fn main() {
    // The reflector's start-up check of a configuration passes.
    if std::env::args().any(|arg| arg == "--check") {
        return;
    }
    // SAFETY: close(2) of standard output, which nothing here uses again.
    unsafe { libc::close(1) };
    eprintln!("mute-vmm: closed its standard output, running on");
    let mut byte = [0u8; 1];
    while matches!(std::io::stdin().read(&mut byte), Ok(n) if n > 0) {}
}
