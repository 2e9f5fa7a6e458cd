//! Connecting to PostgreSQL at start, with retries, and the pieces every
//! host builds from settings (the broker: [`crate::transport`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use migration::{Migrator, MigratorTrait};
use orders::notifications::NotificationHandler;
use orders::payment::RandomPayment;
use orders::topology::{self as order_topology, NOTIFICATIONS_CONSUMER, ORDER_SAGA_CONSUMER};
use orders::{OrderHooks, OrderSaga};
use saga::admin::Sagas;
use saga::clock::SystemClock;
use saga::consumer::{Consumer, RetryPolicy, SagaHandler};
use saga::engine::{EngineSettings, SagaEngine};
use saga::outbox::{OutboxHandle, OutboxRelay, RelaySettings};
use saga::transport::Transport;
use saga::transport::rabbitmq::Topology;
use sea_orm::{ConnectOptions, Database, DatabaseConnection};

use crate::settings::Settings;
use crate::transport::HostTransport;

/// Connects to the database, retrying for `database.connect_retry_seconds`.
pub async fn connect_database(settings: &Settings) -> anyhow::Result<DatabaseConnection> {
    let mut options = ConnectOptions::new(settings.database.connection_url());
    options
        .max_connections(settings.database.max_connections)
        .min_connections(1)
        .acquire_timeout(Duration::from_secs(
            settings.database.acquire_timeout_seconds,
        ))
        .connect_timeout(Duration::from_secs(
            settings.database.acquire_timeout_seconds,
        ))
        .sqlx_logging(false);
    let deadline = Instant::now() + Duration::from_secs(settings.database.connect_retry_seconds);
    let mut delay = Duration::from_millis(200);
    loop {
        match Database::connect(options.clone()).await {
            Ok(mut db) => {
                count_statements(&mut db);
                return Ok(db);
            }
            Err(e) if Instant::now() < deadline => {
                tracing::warn!(error = %e, "database not reachable yet; retrying in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                return Err(e).context(format!(
                    "Failed to connect to the database at database.url (after {} s)",
                    settings.database.connect_retry_seconds
                ));
            }
        }
    }
}

/// Counts every statement the connection runs
/// ([`crate::metrics::DB_STATEMENTS`]): the round trips to the database,
/// which the benchmark reports per order.
pub fn count_statements(db: &mut DatabaseConnection) {
    db.set_metric_callback(|_| metrics::counter!(crate::metrics::DB_STATEMENTS).increment(1));
}

/// Waits until the API host has applied every migration (the runner and the
/// scheduler never migrate; they wait for the schema instead).
pub async fn wait_for_schema(db: &DatabaseConnection, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let pending = Migrator::get_pending_migrations(db).await;
        match pending {
            Ok(p) if p.is_empty() => return Ok(()),
            Ok(p) if Instant::now() < deadline => {
                tracing::info!(
                    pending = p.len(),
                    "waiting for the api host to apply migrations"
                );
            }
            Err(e) if Instant::now() < deadline => {
                tracing::info!(error = %e, "waiting for the schema");
            }
            Ok(p) => anyhow::bail!(
                "{} migrations still pending; start the api host first",
                p.len()
            ),
            Err(e) => return Err(e).context("Failed to read the migration status"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The RabbitMQ topology (the embedded host's in-process transport
/// declares the same queues).
pub fn topology(settings: &Settings) -> Topology {
    crate::transport::rabbit_topology(settings)
}

/// The order saga with its timings (`payment.delay_ms`,
/// `expiration.processing_timeout_seconds`).
pub fn order_saga(settings: &Settings) -> OrderSaga {
    OrderSaga {
        payment_delay: chrono::Duration::milliseconds(
            i64::try_from(settings.payment.delay_ms).unwrap_or(i64::MAX),
        ),
        processing_timeout: chrono::Duration::seconds(
            i64::try_from(settings.expiration.processing_timeout_seconds).unwrap_or(i64::MAX),
        ),
    }
}

/// The engine's limits and retry budget (`retry.*`, `expiration.batch_size`,
/// `expiration.sweep_workers`).
pub fn engine_settings(settings: &Settings) -> EngineSettings {
    EngineSettings {
        max_conflict_retries: 10,
        retry: retry_policy(settings),
        sweep_batch_size: settings.expiration.batch_size,
        sweep_workers: settings.expiration.sweep_workers,
        timer_batch_size: settings.timers.batch_size,
    }
}

/// The retry budget and backoff of failing inputs (`retry.*`).
pub fn retry_policy(settings: &Settings) -> RetryPolicy {
    RetryPolicy {
        max_attempts: settings.retry.max_attempts,
        initial_backoff: Duration::from_millis(settings.retry.initial_backoff_ms),
        max_backoff: Duration::from_millis(settings.retry.max_backoff_ms),
    }
}

/// Waits for `work` to finish, or gives up `grace` after `shutdown` fired
/// (whatever is still unacknowledged then goes back to its queue when the
/// connection closes). Returns `None` when it gave up.
pub async fn finish_within<T>(
    work: impl std::future::Future<Output = T>,
    shutdown: &tokio_util::sync::CancellationToken,
    grace: Duration,
) -> Option<T> {
    tokio::pin!(work);
    tokio::select! {
        out = &mut work => return Some(out),
        _ = shutdown.cancelled() => {}
    }
    match tokio::time::timeout(grace, work).await {
        Ok(out) => Some(out),
        Err(_) => {
            tracing::warn!(
                "in-flight work did not finish within {grace:?} of shutdown; exiting anyway"
            );
            None
        }
    }
}

/// The order saga's engine: its hooks draw payments from
/// `payment.success_rate` (and `payment.seed`); its events go to the relay
/// behind `outbox`.
pub fn engine(
    settings: &Settings,
    db: DatabaseConnection,
    outbox: OutboxHandle,
) -> SagaEngine<OrderSaga> {
    SagaEngine::new(order_saga(settings), db)
        .with_hooks(OrderHooks::new(Arc::new(RandomPayment::new(
            settings.payment.success_rate,
            settings.payment.seed,
        ))))
        .with_settings(engine_settings(settings))
        .with_outbox(outbox)
}

/// The outbox handle of a process: its writers lease their events to its
/// relay for `outbox.lease_seconds`.
pub fn outbox_handle(settings: &Settings) -> OutboxHandle {
    OutboxHandle::new(relay_settings(settings).lease)
}

/// `outbox.*`.
pub fn relay_settings(settings: &Settings) -> RelaySettings {
    RelaySettings {
        batch_size: settings.outbox.batch_size,
        lease: chrono::Duration::seconds(
            i64::try_from(settings.outbox.lease_seconds).unwrap_or(i64::MAX),
        ),
        retry_after: chrono::Duration::seconds(1),
        poll_interval: Duration::from_millis(settings.outbox.poll_interval_ms),
    }
}

/// The sagas this deployment runs, for operator commands.
pub fn sagas(engine: &SagaEngine<OrderSaga>) -> Sagas {
    Sagas::new().with(engine.clone())
}

/// A separate host's outbox relay on its broker (see [`relay_on`]).
pub fn relay(
    settings: &Settings,
    db: DatabaseConnection,
    transport: &HostTransport,
    outbox: OutboxHandle,
) -> OutboxRelay {
    relay_on(settings, db, transport.as_dyn(), outbox)
}

/// An outbox relay on any transport (the embedded mode passes the in-memory
/// one); the same settings as [`relay`].
pub fn relay_on(
    settings: &Settings,
    db: DatabaseConnection,
    transport: Arc<dyn Transport>,
    outbox: OutboxHandle,
) -> OutboxRelay {
    OutboxRelay::new(
        db,
        transport,
        Arc::new(SystemClock),
        relay_settings(settings),
        outbox,
    )
}

/// The embedded host's two consumers on its in-process transport, with the
/// RabbitMQ queue names and prefetch (see [`consumers_with`]).
pub fn consumers(
    settings: &Settings,
    transport: Arc<dyn Transport>,
    engine: &SagaEngine<OrderSaga>,
    db: &DatabaseConnection,
) -> (
    Consumer<SagaHandler<OrderSaga>>,
    Consumer<NotificationHandler>,
) {
    consumers_with(
        settings,
        &settings.rabbitmq.queue_prefix,
        settings.rabbitmq.prefetch,
        transport,
        engine,
        db,
    )
}

/// The runner's two consumers (also run by the embedded host): the order
/// saga's `OrderCreated` consumer and the notifications consumer, on the
/// queues of `prefix`, with the configured retry budget and `prefetch`.
pub fn consumers_with(
    settings: &Settings,
    prefix: &str,
    prefetch: u16,
    transport: Arc<dyn Transport>,
    engine: &SagaEngine<OrderSaga>,
    db: &DatabaseConnection,
) -> (
    Consumer<SagaHandler<OrderSaga>>,
    Consumer<NotificationHandler>,
) {
    let saga = Consumer::new(
        transport.clone(),
        order_topology::saga_queue(prefix),
        ORDER_SAGA_CONSUMER,
        Arc::new(SagaHandler::new(engine.clone(), ORDER_SAGA_CONSUMER)),
        retry_policy(settings),
        prefetch,
    )
    .with_batch_size(batch_size(settings));
    let notifications = Consumer::new(
        transport,
        order_topology::notifications_queue(prefix),
        NOTIFICATIONS_CONSUMER,
        Arc::new(
            NotificationHandler::new(db.clone(), engine.clock().clone(), NOTIFICATIONS_CONSUMER)
                .with_retry_budget(settings.retry.max_attempts),
        ),
        retry_policy(settings),
        prefetch,
    )
    .with_batch_size(batch_size(settings));
    (saga, notifications)
}

fn batch_size(settings: &Settings) -> usize {
    usize::try_from(settings.consumers.batch_size).unwrap_or(1)
}

/// What the runner and the scheduler both start with.
pub struct Worker {
    pub db: DatabaseConnection,
    pub transport: HostTransport,
    pub engine: SagaEngine<OrderSaga>,
    pub relay: OutboxRelay,
}

/// Connects to the database (waiting for the api to migrate it) and the
/// broker, and builds the engine and an outbox relay sharing a wake-up signal.
pub async fn worker(settings: &Settings, name: &str) -> anyhow::Result<Worker> {
    let db = connect_database(settings).await?;
    wait_for_schema(
        &db,
        Duration::from_secs(settings.database.connect_retry_seconds),
    )
    .await?;
    let transport = HostTransport::connect(settings, name).await?;
    let outbox = outbox_handle(settings);
    let engine = engine(settings, db.clone(), outbox.clone());
    let relay = relay(settings, db.clone(), &transport, outbox);
    Ok(Worker {
        db,
        transport,
        engine,
        relay,
    })
}
