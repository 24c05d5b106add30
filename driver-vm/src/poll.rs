//! How long a serving driver polls before it sleeps, adapted to how long
//! its sleeps turn out to be, as KVM sizes a halted vCPU's poll
//! (`halt_poll_ns`): a sleep its window would have spared (the work came
//! within the longest window) grows the window; a sleep no window would
//! have spared (the work came later) shrinks it.
//!
//! Why: a driver VM's poll holds a core, and on this 2-core machine the
//! threads the next request waits for need it. Under a stream of requests
//! the gaps are short and the window stays long (a sleep and a wake-up are
//! two exits, dearer than the poll); between the frames of a guest's ping,
//! a millisecond or more apart, a 300 us poll after every frame took the
//! cores the guests and the reflector needed (ping p50 3.15-3.35 ms against
//! 2.45-2.51 with no poll, README "Serving a network").
//!
//! Sans-IO: the caller measures time and sleeps; this only decides.

/// The smallest window worth polling, in microseconds: a shorter one is
/// over before a request published in it could be seen (one look at the
/// rings and the device takes about a microsecond), so it becomes none.
pub const MIN_US: u64 = 10;

/// A driver's current poll window, between 0 and its longest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PollWindow {
    us: u64,
    max_us: u64,
}

impl PollWindow {
    /// A window that starts at its longest, `max_us` (a driver that just
    /// started has work coming: a failover's replayed requests, a stream
    /// that was waiting for it); 0 never polls.
    pub fn new(max_us: u64) -> Self {
        PollWindow { us: max_us, max_us }
    }

    /// How long to poll now, in microseconds.
    pub fn us(&self) -> u64 {
        self.us
    }

    /// After a sleep: `idle_us` is how long the driver had nothing to do,
    /// from the end of its last work to the wake-up (its poll included).
    pub fn slept(&mut self, idle_us: u64) {
        if idle_us <= self.max_us {
            // A longer window would have caught this work without the
            // sleep's two exits: double it (from the least worth polling).
            self.us = self.us.saturating_mul(2).max(MIN_US).min(self.max_us);
        } else {
            // No window would have: the poll was spent for nothing.
            self.us /= 2;
            if self.us < MIN_US {
                self.us = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec;
    use std::vec::Vec;

    use super::{PollWindow, MIN_US};

    #[test]
    fn a_window_starts_at_its_longest_and_zero_never_polls() {
        assert_eq!(PollWindow::new(300).us(), 300);
        let mut never = PollWindow::new(0);
        never.slept(5);
        never.slept(5_000);
        assert_eq!(never.us(), 0);
    }

    #[test]
    fn long_sleeps_shrink_the_window_to_none() {
        let mut window = PollWindow::new(300);
        let mut seen = vec![window.us()];
        while window.us() > 0 {
            window.slept(2_000);
            seen.push(window.us());
        }
        assert_eq!(seen, [300, 150, 75, 37, 18, 0]);
    }

    #[test]
    fn sleeps_a_window_would_have_spared_grow_it_back_to_its_longest() {
        let mut window = PollWindow::new(300);
        for _ in 0..10 {
            window.slept(10_000);
        }
        assert_eq!(window.us(), 0);
        let mut seen = vec![];
        for _ in 0..7 {
            window.slept(40);
            seen.push(window.us());
        }
        assert_eq!(seen, [MIN_US, 20, 40, 80, 160, 300, 300]);
    }

    /// Serves `gaps` (microseconds between the end of one piece of work
    /// and the next) with `window`: a gap inside the window is caught by
    /// the poll, a longer one is slept through. Returns the windows after
    /// each gap.
    fn serve(window: &mut PollWindow, gaps: &[u64]) -> Vec<u64> {
        gaps.iter()
            .map(|&gap| {
                if gap > window.us() {
                    window.slept(gap);
                }
                window.us()
            })
            .collect()
    }

    #[test]
    fn work_that_alternates_short_and_long_gaps_keeps_the_window_short() {
        // A ping's frames: a driver hands one to the card, the card answers
        // within tens of microseconds, the next frame comes a millisecond
        // or more later.
        let mut window = PollWindow::new(300);
        let ping: Vec<u64> = [40, 1_500].repeat(20);
        let seen = serve(&mut window, &ping);
        assert!(seen[10..].iter().all(|&us| us <= 2 * 40), "windows {seen:?}");
        // A stream whose gaps the short window misses grows it until it
        // catches them.
        let stream = serve(&mut window, &[200; 8]);
        assert!(stream[2..].iter().all(|&us| us >= 200), "windows {stream:?}");
    }

    #[test]
    fn a_stream_whose_gaps_the_window_catches_never_changes_it() {
        let mut window = PollWindow::new(300);
        assert!(serve(&mut window, &[5, 50, 250, 299, 300]).iter().all(|&us| us == 300));
    }
}
