//! Rate-limited log lines: a flood of refusals must not become a flood of log writes.

use std::time::Duration;

use tokio::time::Instant;

/// At most one line per interval, saying how many were skipped.
#[derive(Debug)]
pub(crate) struct LogLimiter {
    every: Duration,
    next: Option<Instant>,
    skipped: u64,
}

impl LogLimiter {
    /// One line per `every`.
    pub(crate) fn new(every: Duration) -> Self {
        Self { every, next: None, skipped: 0 }
    }

    /// `Some(skipped since the last line)` if a line may be written now.
    pub(crate) fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.next.is_some_and(|n| now < n) {
            self.skipped += 1;
            return None;
        }
        self.next = Some(now + self.every);
        Some(std::mem::take(&mut self.skipped))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_line_per_interval_with_the_count_skipped() {
        let mut l = LogLimiter::new(Duration::from_secs(10));
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), None);
        assert_eq!(l.allow(), None);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(l.allow(), Some(2));
    }
}
