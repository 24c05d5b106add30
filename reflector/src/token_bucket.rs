//! A token bucket: what a hostile party's output may cost the reflector
//! (the console relay's log and reads, the supervisor's reads of a vmm's
//! report), refilled at a rate, saved up to a burst.

use std::time::{Duration, Instant};

/// `rate` tokens a second, at most `burst` saved.
#[derive(Debug)]
pub struct TokenBucket {
    tokens: u64,
    rate: u64,
    burst: u64,
    last: Instant,
}

impl TokenBucket {
    /// A bucket holding its whole burst.
    pub fn full(rate: u64, burst: u64) -> Self {
        TokenBucket { tokens: burst, rate, burst, last: Instant::now() }
    }

    /// The tokens now.
    pub fn tokens(&mut self) -> u64 {
        let now = Instant::now();
        // In u128: a bucket idle for days at a rate of millions overflowed
        // u64 (a panic in a debug build, a wrong count in a release one).
        let earned = now.saturating_duration_since(self.last).as_micros() * u128::from(self.rate) / 1_000_000;
        let earned = u64::try_from(earned).unwrap_or(u64::MAX);
        if earned > 0 {
            self.last = now;
        }
        self.tokens = self.tokens.saturating_add(earned).min(self.burst);
        self.tokens
    }

    /// Takes `n` (at most what there is).
    pub fn spend(&mut self, n: u64) {
        self.tokens = self.tokens.saturating_sub(n);
    }

    /// How long until there are `n` (a microsecond at least).
    pub fn until(&mut self, n: u64) -> Duration {
        let missing = n.saturating_sub(self.tokens());
        Duration::from_micros(missing.saturating_mul(1_000_000) / self.rate.max(1) + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_gives_its_burst_then_waits_for_its_rate() {
        let mut bucket = TokenBucket::full(1000, 100);
        assert_eq!(bucket.tokens(), 100);
        bucket.spend(150);
        assert!(bucket.tokens() < 100);
        assert!(bucket.until(100) >= Duration::from_millis(50), "{:?}", bucket.until(100));
    }

    /// A bucket idle long at its rate is full, not an overflow (before:
    /// 12.7 idle days at 16 MiB a second overflowed u64; here a second at
    /// 2^60 a second does).
    #[test]
    fn a_bucket_idle_long_is_full() {
        let mut bucket = TokenBucket::full(1 << 60, 1 << 20);
        bucket.spend(1 << 20);
        bucket.last = Instant::now().checked_sub(Duration::from_secs(1)).unwrap();
        assert_eq!(bucket.tokens(), 1 << 20);
        assert!(bucket.until(u64::MAX) > Duration::ZERO);
    }
}
