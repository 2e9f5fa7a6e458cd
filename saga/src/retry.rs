//! The retry budget: how often a failing input is tried, how long to wait
//! between tries, and what one more failure did to the budget. Shared by the
//! consumers (which wait) and the engine (which persists the count).

use std::time::Duration;

/// Retry schedule: `initial_backoff * 2^(attempt-1)`, capped, with jitter
/// supplied by the caller (so the schedule itself is deterministic).
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Attempts in one budget, the first included (`retry.max_attempts`).
    pub max_attempts: u32,
    /// Wait after the first failed attempt; doubles after each further one.
    pub initial_backoff: Duration,
    /// Upper bound of one wait.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// Delay before attempt `attempt + 1`; `jitter` in `[0, 1)` adds up to half again.
    pub fn delay_after(&self, attempt: u32, jitter: f64) -> Duration {
        let exp = self
            .initial_backoff
            .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1).min(16)));
        let base = exp.min(self.max_backoff);
        base + base.mul_f64(jitter.clamp(0.0, 1.0) / 2.0)
    }

    /// The budget for an error: the whole policy when it may pass, a single
    /// attempt when it never will.
    pub fn budget_for(&self, retryable: bool) -> i32 {
        if retryable {
            i32::try_from(Ord::max(self.max_attempts, 1)).unwrap_or(i32::MAX)
        } else {
            1
        }
    }
}

/// The retry budget after one more failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attempts {
    /// Failed attempts in the current budget, this one included.
    pub spent: i32,
    /// The budget is spent: the instance is now parked (or the message is
    /// given up on).
    pub exhausted: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_then_caps() {
        let policy = RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(350),
        };
        assert_eq!(policy.delay_after(1, 0.0), Duration::from_millis(100));
        assert_eq!(policy.delay_after(2, 0.0), Duration::from_millis(200));
        assert_eq!(policy.delay_after(3, 0.0), Duration::from_millis(350));
        assert_eq!(policy.delay_after(2, 1.0), Duration::from_millis(300));
    }

    #[test]
    fn a_terminal_error_has_a_budget_of_one() {
        let policy = RetryPolicy::default();
        assert_eq!(policy.budget_for(true), 3);
        assert_eq!(policy.budget_for(false), 1);
    }
}
