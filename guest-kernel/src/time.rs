//! Time from the TSC, whose frequency the vmm reads from KVM (hosted: the
//! monotonic clock, in nanoseconds).

use core::sync::atomic::{AtomicU64, Ordering};

#[cfg(driver_vm_isolated)]
use crate::arch::rdtsc;

/// Nanoseconds of the monotonic clock, as the hosted kernel's ticks (its
/// tick rate is set to 1 GHz).
#[cfg(not(driver_vm_isolated))]
fn rdtsc() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into `now`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    (now.tv_sec as u64).wrapping_mul(1_000_000_000).wrapping_add(now.tv_nsec as u64)
}

#[cfg(driver_vm_isolated)]
static TSC_KHZ: AtomicU64 = AtomicU64::new(1);
#[cfg(not(driver_vm_isolated))]
static TSC_KHZ: AtomicU64 = AtomicU64::new(1_000_000);

#[cfg(driver_vm_isolated)]
pub(crate) fn init(tsc_khz: u64) {
    TSC_KHZ.store(tsc_khz.max(1), Ordering::Relaxed);
}

/// A point in time (TSC ticks).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Instant(u64);

impl Instant {
    /// Now.
    pub fn now() -> Self {
        Instant(rdtsc())
    }

    /// Microseconds since `self`.
    pub fn elapsed_us(self) -> u64 {
        ticks_to_us(rdtsc().saturating_sub(self.0))
    }
}

/// Converts TSC ticks to microseconds.
pub fn ticks_to_us(ticks: u64) -> u64 {
    // kHz = ticks per millisecond, so ticks * 1000 / kHz = microseconds.
    (ticks as u128 * 1000 / TSC_KHZ.load(Ordering::Relaxed) as u128) as u64
}

/// Busy-waits for `us` microseconds.
pub fn spin_us(us: u64) {
    let start = Instant::now();
    while start.elapsed_us() < us {
        core::hint::spin_loop();
    }
}
