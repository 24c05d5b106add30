//! A device's register window as drivers use it: 32-bit registers, and
//! waiting for the device with its interrupt once polling has gone on long
//! enough.

use core::sync::atomic::{fence, Ordering};

use guest_kernel::abi::Plain;
use guest_kernel::device::{Doorbell, InterruptLine, Window};
use guest_kernel::{time, Kernel};

use crate::Error;

/// Polling before sleeping on the device's interrupt, in microseconds (see
/// `channel::ChannelDriver::POLL_WINDOW_US`).
const POLL_WINDOW_US: u64 = 300;

/// Window `regs` and the device's interrupt line.
pub struct Registers {
    window: Window,
    interrupt: InterruptLine,
    /// The register that asks the device to raise its interrupt.
    interrupt_wanted: usize,
}

impl Registers {
    /// Window `name` and interrupt line `line`; `interrupt_wanted` is the
    /// offset of the register that asks the device for interrupts.
    pub fn new(kernel: &Kernel, name: &'static str, line: usize, interrupt_wanted: usize) -> Result<Self, Error> {
        Ok(Registers {
            window: kernel.window(name).ok_or(Error::MissingWindow(name))?,
            interrupt: kernel.interrupt_line(line).ok_or(Error::MissingInterrupt(line))?,
            interrupt_wanted,
        })
    }

    /// The window.
    pub fn window(&self) -> &Window {
        &self.window
    }

    /// Register `offset`.
    pub fn get(&self, offset: usize) -> u32 {
        self.window.atomic_u32(offset).load(Ordering::Acquire)
    }

    /// Sets register `offset`.
    pub fn set(&self, offset: usize, value: u32) {
        self.window.atomic_u32(offset).store(value, Ordering::Release);
    }

    /// Reads a structure at `offset` (a queue entry).
    pub fn read<T: Plain>(&self, offset: usize) -> T {
        self.window.read(offset)
    }

    /// Writes a structure at `offset` (a queue entry).
    pub fn write<T: Plain>(&self, offset: usize, value: T) {
        self.window.write(offset, value)
    }

    /// Tells the device about what was just written, with `doorbell` (an
    /// exit) only if its register `awake` is clear: a device clears it
    /// before it looks for work one last time and sleeps, so either it sees
    /// the write or this sees it asleep (both sides fence).
    pub fn ring_unless_awake(&self, doorbell: &Doorbell, awake: usize) {
        fence(Ordering::SeqCst);
        if self.get(awake) == 0 {
            doorbell.ring(1);
        }
    }

    /// Asks the device to interrupt (or not) when it completes something;
    /// fenced, so a check that follows sees what the device did before.
    pub fn want_interrupt(&self, on: bool) {
        self.window.atomic_u32(self.interrupt_wanted).store(u32::from(on), Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }

    /// Waits until `done` holds: polls, then sleeps on the interrupt. The
    /// reflector's hang deadline bounds the wait.
    pub fn wait_for(&self, done: impl Fn(&Self) -> bool) {
        let start = time::Instant::now();
        while !done(self) {
            if start.elapsed_us() < POLL_WINDOW_US {
                core::hint::spin_loop();
                continue;
            }
            self.want_interrupt(true);
            if !done(self) {
                self.interrupt.wait();
            }
            self.want_interrupt(false);
        }
    }
}
