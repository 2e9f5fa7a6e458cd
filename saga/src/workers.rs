//! The loops that drive a saga besides its consumers: timer workers fire
//! due timers, sweepers apply state timeouts. Each only schedules the
//! engine's steps ([`SagaEngine::fire_due_timers`],
//! [`SagaEngine::sweep_all`]), which tests call directly. The outbox relay
//! ([`crate::outbox::OutboxRelay`]) and the consumers
//! ([`crate::consumer::Consumer`]) have their own `run_until_stopped`.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::definition::Saga;
use crate::engine::SagaEngine;

/// Fires a saga's due timers, up to `EngineSettings::timer_batch_size` per
/// transaction ([`SagaEngine::fire_due_timers`]). Several workers (in one
/// process or many) share the due timers through `SKIP LOCKED`.
pub struct TimerWorker<S: Saga> {
    engine: SagaEngine<S>,
    poll: Duration,
}

impl<S: Saga> TimerWorker<S> {
    /// A worker that looks for due timers at least every `poll` (timers
    /// written by other processes are seen within that time).
    pub fn new(engine: SagaEngine<S>, poll: Duration) -> Self {
        Self { engine, poll }
    }

    /// Fires due timers, a full batch after another while a backlog lasts,
    /// then sleeps until the next one is due (at most `poll`); backs off
    /// while firing fails (the database is down), without spending any
    /// budget on the outage itself. Returns when `shutdown` is cancelled.
    ///
    /// After a round that fired a partial batch (the due timers were
    /// drained), the worker sleeps at least `poll / 4` before it claims
    /// again, even when more timers are already due: timers that fall due
    /// one after another (a steady flow of short delays) are then fired
    /// together, a transaction per gathering instead of one for every few
    /// timers. A timer is fired at most that much later; the bound for
    /// timers written by other processes stays `poll`.
    pub async fn run_until_stopped(&self, shutdown: CancellationToken) {
        let mut failures: u32 = 0;
        let batch = self.engine.settings().timer_batch_size;
        let full = usize::try_from(batch.max(1)).unwrap_or(usize::MAX);
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let mut failed = false;
            let mut fired_some = false;
            loop {
                match self.engine.fire_due_timers(batch).await {
                    Ok(fired) => {
                        if shutdown.is_cancelled() {
                            return;
                        }
                        fired_some |= !fired.is_empty();
                        if fired.len() < full {
                            break;
                        }
                    }
                    Err(e) => {
                        failures = failures.saturating_add(1);
                        // Repeated while the database is down: log the first
                        // failures loudly, then back off quietly.
                        if failures <= 3 {
                            tracing::error!(saga_type = S::TYPE, error = %e, "firing a timer failed");
                        } else {
                            tracing::debug!(saga_type = S::TYPE, error = %e, failures, "firing a timer failed again");
                        }
                        failed = true;
                        break;
                    }
                }
            }
            let wait = if failed {
                (self.poll * 2u32.saturating_pow(failures.min(6))).min(Duration::from_secs(5))
            } else {
                if failures > 0 {
                    tracing::info!(saga_type = S::TYPE, failures, "timers fire again");
                }
                failures = 0;
                self.wait_after(fired_some).await
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// How long to sleep after a round of firing: until the next timer is
    /// due, at most `poll`; at least `poll / 4` after a round that fired
    /// timers (see [`Self::run_until_stopped`]).
    async fn wait_after(&self, fired_some: bool) -> Duration {
        let gather = if fired_some {
            self.poll / 4
        } else {
            Duration::ZERO
        };
        let until_due = match self.engine.next_timer_due().await {
            Ok(Some(due)) => (due - self.engine.clock().now())
                .to_std()
                .unwrap_or(Duration::ZERO),
            _ => self.poll,
        };
        until_due.clamp(gather, self.poll.max(gather))
    }
}

/// Applies a saga's state timeouts ([`Saga::state_timeouts`]) every
/// `interval`. Several sweepers may run; each instance is handled once
/// (rows are locked with `SKIP LOCKED`, and the version check settles a
/// sweep racing any other input).
pub struct SweepWorker<S: Saga> {
    engine: SagaEngine<S>,
    interval: Duration,
}

impl<S: Saga> SweepWorker<S> {
    /// A sweeper that runs every `interval` (the first sweep at once).
    pub fn new(engine: SagaEngine<S>, interval: Duration) -> Self {
        Self { engine, interval }
    }

    /// Sweeps every `interval` until `shutdown` is cancelled.
    pub async fn run_until_stopped(&self, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let swept = self.engine.sweep_all().await;
            crate::metrics::sweep(S::TYPE, swept.is_ok());
            match swept {
                Ok(outcome) if outcome.timed_out > 0 => tracing::info!(
                    saga_type = S::TYPE,
                    timed_out = outcome.timed_out,
                    "state-timeout sweep moved instances on"
                ),
                Ok(_) => tracing::debug!(saga_type = S::TYPE, "state-timeout sweep found nothing"),
                Err(e) => {
                    tracing::error!(saga_type = S::TYPE, error = %e, "state-timeout sweep failed")
                }
            }
        }
    }
}
