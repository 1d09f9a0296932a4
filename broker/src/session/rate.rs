//! Per-session publish rate limits: two token buckets (messages and bytes per second, each
//! holding one second's worth), filled continuously, taken from by every PUBLISH of a device or
//! claim session.
//!
//! A PUBLISH that finds a bucket short is not refused: the session waits until the tokens it
//! owes have refilled before it handles the message, and reads nothing meanwhile. A QoS 1
//! PUBACK therefore comes only when the device is within its rate, a QoS 0 message is stored
//! late rather than dropped, and TCP flow control pushes back on a client that keeps sending:
//! one device can never take more than its share of the broker, whatever its link. The wait
//! races the session's kick, so a revocation or a shutdown is never delayed by it.

use std::time::Duration;

use tokio::time::Instant;

/// One bucket: `rate` tokens per second, at most `rate` held (one second's burst).
#[derive(Debug, Clone, Copy)]
struct Bucket {
    rate: f64,
    /// May go negative: the debt of the last message, paid by waiting.
    tokens: f64,
}

impl Bucket {
    fn new(rate: f64) -> Self {
        Self { rate, tokens: rate }
    }

    fn refill(&mut self, elapsed: Duration) {
        self.tokens = (self.tokens + elapsed.as_secs_f64() * self.rate).min(self.rate);
    }

    /// Takes `n` tokens; returns how long until the bucket is out of debt.
    fn take(&mut self, n: f64) -> Duration {
        self.tokens -= n;
        if self.tokens >= 0.0 || self.rate <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// A session's publish limits.
#[derive(Debug, Clone)]
pub(crate) struct PublishRate {
    messages: Bucket,
    bytes: Bucket,
    at: Instant,
}

impl PublishRate {
    /// `messages` and `bytes` per second; 0 turns that limit off.
    pub(crate) fn new(messages: u64, bytes: u64, now: Instant) -> Self {
        Self { messages: Bucket::new(messages as f64), bytes: Bucket::new(bytes as f64), at: now }
    }

    /// One PUBLISH of `size` bytes at `now`: how long the session must wait before handling it
    /// (zero within the limits).
    pub(crate) fn take(&mut self, size: usize, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.at);
        self.at = now;
        let mut wait = Duration::ZERO;
        if self.messages.rate > 0.0 {
            self.messages.refill(elapsed);
            wait = wait.max(self.messages.take(1.0));
        }
        if self.bytes.rate > 0.0 {
            self.bytes.refill(elapsed);
            wait = wait.max(self.bytes.take(size as f64));
        }
        wait
    }
}

/// Token buckets by key (an identity), for rare, costly messages: CSRs to the issuer. One
/// device's flood must not take the issuer from the whole fleet, and reconnecting must not
/// reset its bucket, so the buckets live broker-wide, not in the session.
#[derive(Debug, Default)]
pub(crate) struct KeyedBuckets {
    buckets: std::sync::Mutex<std::collections::HashMap<String, (f64, Instant)>>,
}

/// Buckets kept before the full ones are forgotten (a full bucket is the same as none).
const MOST_BUCKETS: usize = 100_000;

impl KeyedBuckets {
    /// Takes one token from `key`'s bucket (`burst` tokens, one more every `every`); false
    /// when it is empty.
    pub(crate) fn take(&self, key: &str, burst: usize, every: Duration, now: Instant) -> bool {
        let mut m = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let burst = burst.max(1) as f64;
        let per_sec = 1.0 / every.as_secs_f64().max(1e-3);
        if m.len() >= MOST_BUCKETS && !m.contains_key(key) {
            m.retain(|_, (tokens, at)| {
                *tokens + now.saturating_duration_since(*at).as_secs_f64() * per_sec < burst
            });
        }
        let (tokens, at) = m.entry(key.to_owned()).or_insert((burst, now));
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * per_sec).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Messages handled within `secs` by a client that sends whenever it is let.
    fn handled(mut r: PublishRate, size: usize, secs: u64, start: Instant) -> u32 {
        let mut now = start;
        let mut n = 0;
        while now < start + Duration::from_secs(secs) {
            now += r.take(size, now);
            n += 1;
        }
        n
    }

    #[test]
    fn a_flood_is_held_to_the_rate_after_one_seconds_burst() {
        let t = Instant::now();
        // 100 messages/s: a burst of 100, then 100 per second.
        let n = handled(PublishRate::new(100, 0, t), 10, 10, t);
        assert!((1_090..=1_110).contains(&n), "{n}");
        // 1,000 bytes/s of 100-byte messages: 10 per second.
        let n = handled(PublishRate::new(0, 1_000, t), 100, 10, t);
        assert!((105..=115).contains(&n), "{n}");
        // Both off: nothing waits.
        let mut r = PublishRate::new(0, 0, t);
        assert_eq!(r.take(1 << 20, t), Duration::ZERO);
    }

    #[test]
    fn a_client_within_its_rate_never_waits_and_idle_time_refills_only_one_burst() {
        let t = Instant::now();
        let mut r = PublishRate::new(10, 0, t);
        for i in 0..100u64 {
            assert_eq!(r.take(1, t + Duration::from_millis(100 * i)), Duration::ZERO, "{i}");
        }
        // An hour idle buys one second's burst, not an hour's.
        let later = t + Duration::from_secs(3_600);
        let waits = (0..20).filter(|_| !r.take(1, later).is_zero()).count();
        assert_eq!(waits, 10);
    }

    #[test]
    fn a_key_gets_its_burst_then_one_per_interval_and_other_keys_are_unaffected() {
        let b = KeyedBuckets::default();
        let t0 = Instant::now();
        let every = Duration::from_secs(10);
        assert!((0..3).all(|_| b.take("dev-1", 3, every, t0)));
        assert!(!b.take("dev-1", 3, every, t0));
        assert!(b.take("dev-2", 3, every, t0), "another identity has its own bucket");
        assert!(!b.take("dev-1", 3, every, t0 + Duration::from_secs(9)));
        assert!(b.take("dev-1", 3, every, t0 + Duration::from_secs(11)));
        assert!(!b.take("dev-1", 3, every, t0 + Duration::from_secs(12)));
    }
}
