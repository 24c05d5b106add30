//! How fast one device takes new clients, and how many of its connection
//! lines reach the log.
//!
//! Why: a client that connects and leaves in a loop (or sends one bad
//! message each time) cost the reflector a vhost-user daemon, a worker
//! thread and three or four log lines a connection, as fast as it could
//! connect; its own side costs it a connect and a close. The log is every
//! device's (a journal limits the reflector's whole service by lines), so
//! one tenant's loop dropped the other devices' fault and restart lines
//! (a review found it). A device now takes [`CONNECTION_BURST`] clients at
//! once and then [`CONNECTIONS_PER_SECOND`]; a client past that waits in
//! the socket's backlog for its turn. Its connection lines are logged
//! [`LINE_BURST`] at once and then one every [`SECONDS_A_LINE`] seconds,
//! each saying how many were left out before it.
//!
//! What it is not: a limit on what one connection does (the device's own
//! checks and budgets are), nor on lines a connection's errors log in the
//! vhost-user crate (one or two a connection, so bounded by the pace).

use std::time::Duration;

use crate::token_bucket::TokenBucket;

/// Clients a device takes at once (a QEMU that restarts, tests that
/// reconnect after each case) before the pace applies.
pub const CONNECTION_BURST: u64 = 32;

/// Clients a second a device takes past its burst: an honest QEMU connects
/// once, and again after its own restart or the reflector's.
pub const CONNECTIONS_PER_SECOND: u64 = 4;

/// Connection lines logged at once.
pub const LINE_BURST: u64 = 16;

/// Seconds a connection line past the burst costs.
pub const SECONDS_A_LINE: u64 = 10;

/// One device's pace.
pub struct ConnectionPace {
    turns: TokenBucket,
    /// A line costs [`SECONDS_A_LINE`] tokens, refilled one a second.
    lines: TokenBucket,
    unlogged: u64,
    waits: crate::hw::LogEvery,
}

impl Default for ConnectionPace {
    fn default() -> Self {
        ConnectionPace {
            turns: TokenBucket::full(CONNECTIONS_PER_SECOND, CONNECTION_BURST),
            lines: TokenBucket::full(1, LINE_BURST * SECONDS_A_LINE),
            unlogged: 0,
            waits: crate::hw::LogEvery::default(),
        }
    }
}

impl ConnectionPace {
    /// The next client's turn: None if it may be taken now (its turn is
    /// spent), else how long to wait before asking again.
    pub fn admit(&mut self) -> Option<Duration> {
        if self.turns.tokens() >= 1 {
            self.turns.spend(1);
            return None;
        }
        Some(self.turns.until(1))
    }

    /// Counts a wait for a turn; the count so far if this one is to be
    /// logged (at powers of two).
    pub fn note_wait(&mut self) -> Option<u64> {
        self.waits.note()
    }

    /// Whether a connection line may be logged now: the lines left out
    /// before it, or None if it is left out too (and counted).
    pub fn may_log(&mut self) -> Option<u64> {
        if self.lines.tokens() >= SECONDS_A_LINE {
            self.lines.spend(SECONDS_A_LINE);
            return Some(std::mem::take(&mut self.unlogged));
        }
        self.unlogged += 1;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_clients_is_taken_at_once_and_the_next_waits_its_turn() {
        let started = std::time::Instant::now();
        let mut pace = ConnectionPace::default();
        let mut taken = 0;
        let wait = loop {
            match pace.admit() {
                None => taken += 1,
                Some(wait) => break wait,
            }
            assert!(taken < 10_000, "clients are taken without end");
        };
        // The burst, and what the pace refilled meanwhile (nothing unless
        // this thread was held up a quarter of a second).
        let refilled = started.elapsed().as_millis() as u64 * CONNECTIONS_PER_SECOND / 1000;
        assert!(taken >= CONNECTION_BURST && taken <= CONNECTION_BURST + refilled + 1, "{taken} taken at once");
        let turn = Duration::from_secs(1) / CONNECTIONS_PER_SECOND as u32;
        assert!(wait > Duration::ZERO && wait <= turn + Duration::from_millis(1), "{wait:?}");
        assert_eq!(pace.note_wait(), Some(1));
    }

    #[test]
    fn connection_lines_past_the_burst_are_left_out_and_counted() {
        let mut pace = ConnectionPace::default();
        for line in 0..LINE_BURST {
            assert_eq!(pace.may_log(), Some(0), "line {line} of the burst");
        }
        assert_eq!((0..100).filter_map(|_| pace.may_log()).count(), 0, "lines past the burst were logged");
        // The next line that may be logged says so: here, its bucket given
        // the refill by hand.
        pace.lines = TokenBucket::full(1, SECONDS_A_LINE);
        assert_eq!(pace.may_log(), Some(100));
        assert_eq!(pace.unlogged, 0);
    }
}
