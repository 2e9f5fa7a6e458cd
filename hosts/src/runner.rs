//! The saga runner: consumes `OrderCreated` (saga) and every order event
//! (notifications), fires durable payment timers, and relays the outbox.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use saga::engine::OrderSagaEngine;
use saga::topology::{self, NOTIFICATIONS_CONSUMER, ORDER_SAGA_CONSUMER};
use tokio_util::sync::CancellationToken;

use crate::settings::Settings;
use crate::{infra, ops};
use saga::transport::Transport;

pub use crate::infra::retry_policy;

/// What the runner binary was asked to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Run consumers, timers and the relay until stopped (no arguments).
    Run,
    /// `runner parked [LIMIT]`: list parked order sagas.
    Parked { limit: u64 },
    /// `runner resume ORDER_ID`: resume a parked order saga with a fresh budget.
    Resume { order_id: String },
    /// `runner redrive saga|notifications [LIMIT]`: move messages from a
    /// queue's error queue back to the queue.
    Redrive { queue: String, limit: u32 },
}

pub const USAGE: &str = "usage: runner                       run the saga runner
       runner parked [LIMIT]        list parked order sagas (default 100)
       runner resume ORDER_ID       resume a parked order saga with a fresh retry budget
       runner redrive saga|notifications [LIMIT]
                                    move up to LIMIT (default 1000) messages from the
                                    queue's .error queue back to the queue";

impl Command {
    /// Parses the arguments after the program name.
    pub fn parse(args: &[String]) -> anyhow::Result<Self> {
        let number = |arg: Option<&String>, default: u64, what: &str| -> anyhow::Result<u64> {
            match arg {
                None => Ok(default),
                Some(a) => a.parse::<u64>().ok().filter(|n| *n > 0).with_context(|| {
                    format!("{what} must be a positive number, got `{a}`\n{USAGE}")
                }),
            }
        };
        match args.first().map(String::as_str) {
            None | Some("run") => Ok(Command::Run),
            Some("parked") => Ok(Command::Parked {
                limit: number(args.get(1), 100, "LIMIT")?,
            }),
            Some("resume") => match args.get(1) {
                Some(id) if id.parse::<i64>().is_ok() => Ok(Command::Resume {
                    order_id: id.clone(),
                }),
                Some(id) => {
                    anyhow::bail!("ORDER_ID must be an order id (a number), got `{id}`\n{USAGE}")
                }
                None => anyhow::bail!("resume needs an ORDER_ID\n{USAGE}"),
            },
            Some("redrive") => match args.get(1).map(String::as_str) {
                Some(q @ ("saga" | "notifications")) => Ok(Command::Redrive {
                    queue: q.to_owned(),
                    limit: u32::try_from(number(args.get(2), 1000, "LIMIT")?).unwrap_or(u32::MAX),
                }),
                Some(other) => {
                    anyhow::bail!("redrive takes `saga` or `notifications`, got `{other}`\n{USAGE}")
                }
                None => anyhow::bail!("redrive needs a queue: saga or notifications\n{USAGE}"),
            },
            Some("-h" | "--help" | "help") => anyhow::bail!("{USAGE}"),
            Some(other) => anyhow::bail!("unknown command `{other}`\n{USAGE}"),
        }
    }
}

/// Runs `command` (the runner loop, or one operator command).
pub async fn main(
    command: Command,
    settings: Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    match command {
        Command::Run => run(settings, shutdown).await,
        Command::Parked { limit } => {
            let db = infra::connect_database(&settings).await?;
            let engine = infra::engine(&settings, db, Default::default());
            let parked = engine.parked(limit).await?;
            tracing::info!(count = parked.len(), "parked order sagas");
            for p in &parked {
                tracing::info!(
                    order_id = %p.correlation_id,
                    state = %p.state,
                    attempts = p.attempts,
                    parked_at = %p.parked_at.to_rfc3339(),
                    last_error = p.last_error.as_deref().unwrap_or(""),
                    "parked"
                );
            }
            // The list is the command's output: one JSON document on stdout.
            let out = serde_json::to_string_pretty(&parked)?;
            use std::io::Write;
            writeln!(std::io::stdout(), "{out}")?;
            Ok(())
        }
        Command::Resume { order_id } => {
            let db = infra::connect_database(&settings).await?;
            let signal = Arc::new(tokio::sync::Notify::new());
            let engine = infra::engine(&settings, db, signal);
            let resumed = engine
                .resume(&order_id)
                .await
                .with_context(|| format!("Failed to resume order {order_id}"))?;
            tracing::info!(
                order_id = %order_id,
                state = %resumed.state,
                rerun = ?resumed.rerun,
                "resumed; a running runner publishes what it queued"
            );
            Ok(())
        }
        Command::Redrive { queue, limit } => {
            let transport = infra::connect_broker(&settings, "order-saga redrive").await?;
            let prefix = &settings.rabbitmq.queue_prefix;
            let (spec, consumer) = if queue == "saga" {
                (topology::saga_queue(prefix), ORDER_SAGA_CONSUMER)
            } else {
                (
                    topology::notifications_queue(prefix),
                    NOTIFICATIONS_CONSUMER,
                )
            };
            let moved = transport.redrive(&spec, limit).await?;
            transport.close().await;
            // Messages without a saga instance keep their budget per message:
            // a re-driven one starts afresh. (A saga's budget is reset by
            // `resume`, which should come first.)
            let ids: Vec<uuid::Uuid> = moved
                .iter()
                .flatten()
                .filter_map(|id| id.parse().ok())
                .collect();
            let db = infra::connect_database(&settings).await?;
            let forgotten = saga::failures::forget(&db, consumer, &ids).await?;
            tracing::info!(
                moved = moved.len(),
                budgets_reset = forgotten,
                from = %spec.error_queue(),
                to = %spec.name,
                "re-drove dead letters"
            );
            Ok(())
        }
    }
}

pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    crate::metrics::handle();
    let infra::Worker {
        db,
        transport,
        engine,
        relay,
    } = infra::worker(&settings, "order-saga runner").await?;
    let (saga_consumer, notification_consumer) =
        infra::consumers(&settings, transport.clone(), &engine, &db);
    let stop = shutdown.child_token();
    let monitor = Arc::new(
        ops::Monitor::new(db.clone(), engine.clock().clone(), &settings)
            .with_broker(ops::Broker::rabbit(transport.clone()))
            .with_consumers(
                transport.consumer_status(),
                &[ORDER_SAGA_CONSUMER, NOTIFICATIONS_CONSUMER],
            )
            .with_shutdown(stop.clone()),
    );
    let listener = ops::bind(
        &settings.monitoring.runner_listen,
        "monitoring.runner_listen",
    )
    .await?;
    let loops = monitor.loops().clone();
    tracing::info!(
        payment_delay_ms = settings.payment.delay_ms,
        success_rate = settings.payment.success_rate,
        "runner started"
    );

    // The transport resubscribes by itself after the broker comes back, so a
    // consumer only stops on shutdown or when the transport was closed; then
    // the rest stops too, and the runner exits non-zero in the second case.
    let poll = Duration::from_millis(settings.timers.poll_interval_ms);
    let work = async {
        tokio::join!(
            loops.run("order-saga consumer", async {
                let r = saga_consumer.run_until_stopped(stop.clone()).await;
                stop.cancel();
                r
            }),
            loops.run("notifications consumer", async {
                let r = notification_consumer.run_until_stopped(stop.clone()).await;
                stop.cancel();
                r
            }),
            loops.run("timers", async {
                // Each loop fires one timer per transaction; several share
                // the due timers through SKIP LOCKED.
                let workers = usize::try_from(settings.timers.workers).unwrap_or(1);
                futures_util::future::join_all(
                    (0..workers).map(|_| run_timers(&engine, poll, stop.clone())),
                )
                .await;
            }),
            loops.run("outbox relay", relay.run_until_stopped(stop.clone())),
            async {
                let r = ops::serve(listener, monitor.clone(), stop.clone()).await;
                stop.cancel();
                r
            },
        )
    };
    let grace = Duration::from_secs(settings.shutdown.grace_seconds);
    let finished = infra::finish_within(work, &stop, grace).await;
    transport.close().await;
    if let Some((saga_result, notification_result, (), (), monitoring)) = finished {
        saga_result.context("order-saga consumer stopped")?;
        notification_result.context("notifications consumer stopped")?;
        monitoring?;
    }
    tracing::info!("runner stopped");
    Ok(())
}

/// Fires due timers until none is due, then sleeps until the next one is due
/// (at most `poll` so timers written by other runners are seen).
pub async fn run_timers(engine: &OrderSagaEngine, poll: Duration, shutdown: CancellationToken) {
    let mut failures: u32 = 0;
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let mut failed = false;
        loop {
            match engine.try_fire_due_timer_once().await {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(e) => {
                    failures = failures.saturating_add(1);
                    // Repeated while the database is down: log the first
                    // failures loudly, then back off quietly.
                    if failures <= 3 {
                        tracing::error!(error = %e, "firing a timer failed");
                    } else {
                        tracing::debug!(error = %e, failures, "firing a timer failed again");
                    }
                    failed = true;
                    break;
                }
            }
        }
        let mut wait = poll;
        if failed {
            wait = (poll * 2u32.saturating_pow(failures.min(6))).min(Duration::from_secs(5));
        } else {
            if failures > 0 {
                tracing::info!(failures, "timers fire again");
            }
            failures = 0;
            if let Ok(Some(due)) = engine.next_timer_due().await {
                let until = (due - engine.clock().now())
                    .to_std()
                    .unwrap_or(Duration::ZERO);
                wait = wait.min(until);
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
