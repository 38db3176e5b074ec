//! Per-item replication figures: what the operator sees in `ferry item show` and the metrics.
//! Rates are measured over a sliding window so a burst or a pause shows within a minute.

use std::time::Instant;

/// Width of the rate window, seconds.
const WINDOW_SECS: u64 = 60;
/// Buckets of the window.
const BUCKETS: usize = 12;

/// Bytes per second over the last minute.
#[derive(Debug, Clone)]
pub struct Rate {
    start: Instant,
    /// (bucket number since `start`, bytes in it).
    buckets: [(u64, u64); BUCKETS],
}

impl Default for Rate {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            buckets: [(u64::MAX, 0); BUCKETS],
        }
    }
}

impl Rate {
    fn bucket_now(&self) -> u64 {
        self.start.elapsed().as_secs() / (WINDOW_SECS / BUCKETS as u64)
    }

    /// Counts `bytes` now.
    pub fn add(&mut self, bytes: u64) {
        let b = self.bucket_now();
        let slot = &mut self.buckets[usize::try_from(b % BUCKETS as u64).unwrap_or(0)];
        if slot.0 != b {
            *slot = (b, 0);
        }
        slot.1 += bytes;
    }

    /// Bytes per second over the window (the current, partial bucket included).
    pub fn per_second(&self) -> f64 {
        let now = self.bucket_now();
        let oldest = now.saturating_sub(BUCKETS as u64 - 1);
        let bytes: u64 = self
            .buckets
            .iter()
            .filter(|(b, _)| *b != u64::MAX && *b >= oldest && *b <= now)
            .map(|(_, n)| n)
            .sum();
        // Over the time the window really covers (a young process has less than a minute).
        let secs = self
            .start
            .elapsed()
            .as_secs_f64()
            .clamp(1.0, WINDOW_SECS as f64);
        bytes as f64 / secs
    }
}

/// What the process role reports about one item.
#[derive(Debug, Clone, Default)]
pub struct ItemFigures {
    /// Bytes journaled and not yet in the vault (complete cycles waiting plus the cycle being
    /// received).
    pub backlog_bytes: u64,
    /// Bytes of the cycle being received (kept by its session).
    pub receiving_bytes: u64,
    /// Frame bytes received.
    pub ingest: Rate,
    /// Cycle bytes drained into the vault.
    pub upload: Rate,
    /// Sessions open now.
    pub sessions: u32,
    /// How long the last drain took, seconds.
    pub last_drain_secs: Option<f64>,
    /// The newest cycle drained and its point.
    pub last_cycle: Option<(u64, String)>,
    /// The last failure (session refused, drain failed), Unix ms and message.
    pub last_error: Option<(u64, String)>,
}

impl ItemFigures {
    /// Seconds the backlog takes to drain at the current upload rate (`None` when nothing
    /// drains now).
    pub fn time_to_drain_secs(&self) -> Option<f64> {
        let up = self.upload.per_second();
        if self.backlog_bytes == 0 {
            Some(0.0)
        } else if up > 0.0 {
            Some(self.backlog_bytes as f64 / up)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_counts_what_was_added_within_the_window() {
        let mut r = Rate::default();
        assert_eq!(r.per_second(), 0.0);
        r.add(1000);
        r.add(500);
        // Less than a second old: the rate is over one second.
        assert!((r.per_second() - 1500.0).abs() < 1e-9, "{}", r.per_second());
        let mut f = ItemFigures {
            backlog_bytes: 3000,
            ..Default::default()
        };
        assert_eq!(f.time_to_drain_secs(), None);
        f.upload.add(1000);
        assert!((f.time_to_drain_secs().unwrap() - 3.0).abs() < 1e-9);
        f.backlog_bytes = 0;
        assert_eq!(f.time_to_drain_secs(), Some(0.0));
    }
}
