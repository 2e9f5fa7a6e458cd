//! Login rate limits: fixed windows counted in memory, per account (failed
//! logins) and per client address (all attempts). One API process keeps its
//! own counts; several replicas each allow the configured numbers.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::settings::AuthSettings;

/// Above this many tracked keys, finished windows are dropped.
const PRUNE_ABOVE: usize = 10_000;

#[derive(Debug)]
struct Window {
    started: Instant,
    count: u32,
}

/// Counts events per key in fixed windows.
#[derive(Debug)]
struct Counter {
    window: Duration,
    max: u32,
    keys: Mutex<HashMap<String, Window>>,
}

impl Counter {
    fn new(window: Duration, max: u32) -> Self {
        Self {
            window,
            max,
            keys: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Window>> {
        // A poisoned lock only means another request panicked mid-update of a
        // counter; the counts are still usable.
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Seconds until `key` may try again, if its window is used up.
    fn blocked_for(&self, key: &str, now: Instant) -> Option<u64> {
        let keys = self.lock();
        let w = keys.get(key)?;
        let ends = w.started + self.window;
        (w.count >= self.max && now < ends).then(|| ceil_seconds(ends - now))
    }

    fn record(&self, key: &str, now: Instant) {
        let mut keys = self.lock();
        if keys.len() > PRUNE_ABOVE {
            let window = self.window;
            keys.retain(|_, w| now < w.started + window);
        }
        let w = keys.entry(key.to_owned()).or_insert(Window {
            started: now,
            count: 0,
        });
        if now >= w.started + self.window {
            *w = Window {
                started: now,
                count: 0,
            };
        }
        w.count = w.count.saturating_add(1);
    }

    fn reset(&self, key: &str) {
        self.lock().remove(key);
    }
}

fn ceil_seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// The login limiter of one API process.
#[derive(Debug)]
pub struct LoginLimiter {
    per_account: Counter,
    per_address: Counter,
}

impl LoginLimiter {
    pub fn new(settings: &AuthSettings) -> Self {
        let window = Duration::from_secs(settings.login_window_seconds);
        Self {
            per_account: Counter::new(window, settings.login_max_failures_per_account),
            per_address: Counter::new(window, settings.login_max_attempts_per_address),
        }
    }

    /// Counts an attempt from `address` for `account`; `Err(seconds)` when
    /// either limit is used up (the attempt must not be checked then).
    pub fn begin(&self, account: &str, address: &str) -> Result<(), u64> {
        let now = Instant::now();
        let wait = [
            self.per_account.blocked_for(account, now),
            self.per_address.blocked_for(address, now),
        ]
        .into_iter()
        .flatten()
        .max();
        // Every attempt counts against the address, refused ones too.
        self.per_address.record(address, now);
        match wait {
            Some(seconds) => Err(seconds.max(1)),
            None => Ok(()),
        }
    }

    /// A failed login counts against the account.
    pub fn failed(&self, account: &str) {
        self.per_account.record(account, Instant::now());
    }

    /// A successful login clears the account's failures.
    pub fn succeeded(&self, account: &str) {
        self.per_account.reset(account);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_blocks_after_max_and_reopens_when_it_ends() {
        let c = Counter::new(Duration::from_secs(10), 2);
        let t0 = Instant::now();
        assert_eq!(c.blocked_for("k", t0), None);
        c.record("k", t0);
        c.record("k", t0);
        assert_eq!(c.blocked_for("k", t0), Some(10));
        assert_eq!(c.blocked_for("other", t0), None);
        let later = t0 + Duration::from_millis(9_500);
        assert_eq!(c.blocked_for("k", later), Some(1));
        assert_eq!(c.blocked_for("k", t0 + Duration::from_secs(10)), None);
        c.record("k", t0 + Duration::from_secs(10));
        assert_eq!(c.blocked_for("k", t0 + Duration::from_secs(10)), None);
    }
}
