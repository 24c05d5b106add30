//! Interrupts of a hosted driver: each line is an eventfd, and sleeping is
//! `poll(2)` on all of them. The pending set is per thread: a hosted driver
//! is one thread, and unit tests run one driver per test thread.

use core::cell::{Cell, RefCell};

use alloc::vec::Vec;

std::thread_local! {
    /// One bit per line, as the isolated kernel's `IRQ_PENDING`.
    static PENDING: Cell<u64> = const { Cell::new(0) };
    /// (eventfd, bit) per interrupt line of this thread's kernel.
    static LINES: RefCell<Vec<(i32, u64)>> = const { RefCell::new(Vec::new()) };
}

/// Makes `lines` (eventfd, bit) this thread's interrupt lines.
pub(crate) fn set_lines(lines: Vec<(i32, u64)>) {
    LINES.with(|cell| *cell.borrow_mut() = lines);
    PENDING.with(|pending| pending.set(0));
}

/// Collects signalled lines into the pending set; with `block`, first waits
/// until one is signalled (returns at once if there are none to wait for).
fn collect(block: bool) {
    LINES.with(|cell| {
        let lines = cell.borrow();
        if lines.is_empty() {
            return;
        }
        let mut fds: Vec<libc::pollfd> =
            lines.iter().map(|(fd, _)| libc::pollfd { fd: *fd, events: libc::POLLIN, revents: 0 }).collect();
        // SAFETY: poll(2) on an array of pollfd this function owns.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, if block { -1 } else { 0 }) };
        if ready <= 0 {
            return;
        }
        for (pollfd, (fd, bit)) in fds.iter().zip(lines.iter()) {
            if pollfd.revents & libc::POLLIN != 0 {
                let mut count = 0u64;
                // SAFETY: reads the 8-byte counter of an eventfd into a local.
                let n = unsafe { libc::read(*fd, (&mut count as *mut u64).cast(), 8) };
                if n == 8 {
                    PENDING.with(|pending| pending.set(pending.get() | bit));
                }
            }
        }
    });
}

/// Sleeps until an interrupt line is signalled, unless one already is.
pub fn wait_for_interrupt() {
    if PENDING.with(Cell::get) == 0 {
        collect(false);
    }
    if PENDING.with(Cell::get) == 0 {
        collect(true);
    }
}

/// Consumes the pending bits in `mask`; whether any was set.
pub fn take_line(mask: u64) -> bool {
    collect(false);
    PENDING.with(|pending| {
        let was = pending.get();
        pending.set(was & !mask);
        was & mask != 0
    })
}

/// Returns and clears the set of interrupts taken since the last call
/// (bit N: line N).
pub fn take_interrupts() -> u64 {
    collect(false);
    PENDING.with(|pending| pending.replace(0))
}
