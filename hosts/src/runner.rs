//! The saga runner: consumes `OrderCreated` (the order saga) and every order
//! event (notifications), fires durable payment timers, and relays the
//! outbox; and the operator commands `parked`, `resume` and `redrive`
//! (`runner --help`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use orders::OrderSaga;
use orders::topology::{NOTIFICATIONS_CONSUMER, ORDER_SAGA_CONSUMER};
use saga::Saga as _;
use saga::workers::TimerWorker;
use tokio_util::sync::CancellationToken;

use crate::settings::Settings;
use crate::{infra, ops};

pub use crate::infra::retry_policy;

/// The saga types this runner knows (operator commands take one).
pub const SAGA_TYPES: [&str; 1] = [OrderSaga::TYPE];
/// The consumers whose error queues `redrive` empties.
pub const CONSUMERS: [&str; 2] = [ORDER_SAGA_CONSUMER, NOTIFICATIONS_CONSUMER];

/// The saga runner: consumers, durable timers and the outbox relay.
#[derive(Debug, Parser)]
#[command(name = "runner", version, about)]
pub struct Cli {
    /// What to do (`run` when omitted).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// What the runner binary was asked to do.
#[derive(Clone, Debug, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Run consumers, timers and the relay until stopped (the default).
    Run,
    /// List parked saga instances as JSON on stdout, oldest first.
    Parked {
        /// Only this saga type (every type when omitted).
        #[arg(long = "saga", value_name = "SAGA_TYPE", value_parser = SAGA_TYPES)]
        saga_type: Option<String>,
        /// At most this many.
        #[arg(default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
        limit: u64,
    },
    /// Resume a parked saga instance with a fresh retry budget (journalled,
    /// and logged as an operator action, under `$USER (cli)`).
    Resume {
        /// The saga type, e.g. `order`.
        #[arg(value_parser = SAGA_TYPES)]
        saga_type: String,
        /// The instance's correlation id (for orders, the order id).
        correlation_id: String,
    },
    /// Move messages from a consumer's `.error` queue back to its queue;
    /// prints the counts before and after (JSON) and logs the action.
    Redrive {
        /// The consumer whose error queue is emptied.
        #[arg(value_parser = CONSUMERS)]
        consumer: String,
        /// At most this many messages.
        #[arg(default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
    },
}

/// Runs `command` (the runner loop, or one operator command).
pub async fn main(
    command: Command,
    settings: Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    match command {
        Command::Run => run(settings, shutdown).await,
        Command::Parked { saga_type, limit } => {
            let db = infra::connect_database(&settings).await?;
            let parked = saga::engine::parked(&db, saga_type.as_deref(), limit).await?;
            tracing::info!(count = parked.len(), "parked saga instances");
            for p in &parked {
                tracing::info!(
                    saga_type = %p.saga_type,
                    correlation_id = %p.correlation_id,
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
        Command::Resume {
            saga_type,
            correlation_id,
        } => {
            let db = infra::connect_database(&settings).await?;
            let sagas = infra::sagas(&infra::engine(
                &settings,
                db,
                infra::outbox_handle(&settings),
            ));
            let operator = crate::operator::cli_operator();
            let resumed = sagas
                .get(&saga_type)?
                .resume_by(&correlation_id, &operator)
                .await
                .with_context(|| format!("Failed to resume {saga_type} saga {correlation_id}"))?;
            tracing::info!(
                saga_type = %saga_type,
                correlation_id = %correlation_id,
                state = resumed.state,
                rerun = ?resumed.rerun,
                operator = %operator,
                "resumed; a running runner publishes what it queued"
            );
            Ok(())
        }
        Command::Redrive { consumer, limit } => {
            let spec = orders::topology::queue_of(&consumer, settings.queue_prefix())
                .with_context(|| format!("no queue for consumer `{consumer}`"))?;
            let transport =
                crate::transport::HostTransport::connect(&settings, "order-saga redrive").await?;
            let db = infra::connect_database(&settings).await?;
            let report = crate::operator::redrive(
                &db,
                &crate::operator::Broker::connected(transport.clone()),
                &consumer,
                &spec,
                limit,
                &crate::operator::cli_operator(),
                chrono::Utc::now(),
            )
            .await;
            transport.close().await;
            // The counts before and after are the command's output.
            let out = serde_json::to_string_pretty(&report?)?;
            use std::io::Write;
            writeln!(std::io::stdout(), "{out}")?;
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
    let (saga_consumer, notification_consumer) = infra::consumers_with(
        &settings,
        settings.queue_prefix(),
        settings.prefetch(),
        transport.as_dyn(),
        &engine,
        &db,
    );
    let stop = shutdown.child_token();
    let lag_queues = CONSUMERS
        .iter()
        .filter_map(|c| {
            orders::topology::queue_of(c, settings.queue_prefix()).map(|q| ((*c).to_owned(), q))
        })
        .collect();
    let monitor = Arc::new(
        ops::Monitor::new(db.clone(), engine.clock().clone(), &settings)
            .with_broker(ops::Broker::connected(transport.clone()))
            .with_consumers(
                transport.consumer_status(),
                &[ORDER_SAGA_CONSUMER, NOTIFICATIONS_CONSUMER],
            )
            .with_lag_of(lag_queues)
            .with_shutdown(stop.clone()),
    );
    let listener = ops::bind(
        &settings.monitoring.runner_listen,
        "monitoring.runner_listen",
    )
    .await?;
    let loops = monitor.loops().clone();
    tracing::info!(
        transport = transport.kind(),
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
                // Each loop fires up to timers.batch_size due timers per
                // transaction; several loops (here or in other runners)
                // share the due timers through SKIP LOCKED.
                let workers = usize::try_from(settings.timers.workers).unwrap_or(1);
                let worker = TimerWorker::new(engine.clone(), poll);
                futures_util::future::join_all(
                    (0..workers).map(|_| worker.run_until_stopped(stop.clone())),
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
