//! The embedded default: the whole system in one process, for a first look
//! with nothing but the Rust toolchain (`cargo run --release`).
//!
//! The API, the runner (both consumers, the durable timers, the outbox relay)
//! and the scheduler run here on the same `saga` engine as the separate
//! hosts, with the same `instance.json` timings and probabilities. Only two
//! things differ:
//!
//! - storage: the same migrations on a SQLite file (`embedded.database_url`,
//!   by default `data/order-saga.db` under the working directory), through a
//!   pool of one connection, so SQLite never reports "database is locked";
//! - transport: [`MemoryTransport`] instead of RabbitMQ (same queues, routing
//!   keys, prefetch, retries and error queues).
//!
//! Single process only: two embedded processes on one SQLite file would
//! each have their own in-memory queues and miss each other's events.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use migration::{Migrator, MigratorTrait};
use poem::Server;
use poem::listener::TcpListener;
use saga::transport::Transport;
use saga::transport::memory::MemoryTransport;
use saga::workers::{SweepWorker, TimerWorker};
use sea_orm::{ConnectOptions, Database, DatabaseConnection};
use tokio_util::sync::CancellationToken;

use crate::api::{self, AppState};
use crate::settings::Settings;
use crate::{infra, ops};

/// The file behind a `sqlite:` URL, if it names one (not `:memory:`).
pub fn sqlite_file(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or(rest);
    if path.is_empty() || path.starts_with(":memory:") {
        return None;
    }
    Some(PathBuf::from(path))
}

/// Opens the SQLite database (creating its folder and file), with one pooled
/// connection, WAL and a busy timeout.
pub async fn connect_sqlite(settings: &Settings) -> anyhow::Result<DatabaseConnection> {
    let url = &settings.embedded.database_url;
    if !url.starts_with("sqlite:") {
        anyhow::bail!(
            "configuration key `embedded.database_url`: must be a sqlite: URL, got `{url}`"
        );
    }
    if let Some(file) = sqlite_file(url)
        && let Some(dir) = file.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("Failed to create the data folder {}", dir.display()))?;
    }
    let mut options = ConnectOptions::new(url.clone());
    options
        // One connection: SQLite has one writer anyway, and a single
        // connection can never be refused with "database is locked".
        .max_connections(1)
        .min_connections(1)
        .acquire_timeout(Duration::from_secs(
            settings.database.acquire_timeout_seconds,
        ))
        .sqlx_logging(false)
        .map_sqlx_sqlite_opts(|o| {
            o.journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
                .busy_timeout(Duration::from_secs(5))
                .foreign_keys(true)
                .create_if_missing(true)
        });
    let mut db = Database::connect(options)
        .await
        .with_context(|| format!("Failed to open the SQLite database {url}"))?;
    infra::count_statements(&mut db);
    Ok(db)
}

/// Runs the whole system in this process until `shutdown` fires.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    crate::metrics::handle();
    let db = connect_sqlite(&settings).await?;
    Migrator::up(&db, None)
        .await
        .context("Failed to apply database migrations")?;
    tracing::info!(database = %settings.embedded.database_url, "database schema is up to date");
    api::seed_admin(&db, &settings).await?;

    let memory = MemoryTransport::new();
    memory.declare(&infra::topology(&settings));
    let transport: Arc<dyn Transport> = Arc::new(memory.clone());
    let outbox = infra::outbox_handle(&settings);
    let engine = infra::engine(&settings, db.clone(), outbox.clone());
    // One relay for the whole process: the API, the timers and the sweep all
    // write to the same outbox and wake it through the same signal.
    let relay = infra::relay_on(&settings, db.clone(), transport.clone(), outbox);
    // One process, one relay: leases left by a previous life of this process
    // (a kill -9) are released now instead of waited out.
    let released = relay
        .release_leases()
        .await
        .context("Failed to release the outbox leases")?;
    if released > 0 {
        tracing::info!(
            released,
            "outbox rows of a previous run released for publishing"
        );
    }

    let consumer_status = transport.consumer_status();
    let (saga_consumer, notification_consumer) =
        infra::consumers(&settings, transport, &engine, &db);

    // Whatever part stops first (a signal, or the HTTP server failing to
    // bind) stops the rest; in-flight work finishes before we return.
    let stop = shutdown.child_token();
    // The same health checks as the separate hosts, on the API's port.
    let monitor = Arc::new(
        ops::Monitor::new(db.clone(), engine.clock().clone(), &settings)
            .with_broker(ops::Broker::InProcess)
            .with_consumers(
                consumer_status,
                &[
                    orders::topology::ORDER_SAGA_CONSUMER,
                    orders::topology::NOTIFICATIONS_CONSUMER,
                ],
            )
            .with_shutdown(stop.clone()),
    );
    let loops = monitor.loops().clone();
    let console = crate::console::Console::new(&settings, infra::sagas(&engine))
        .with_broker(crate::operator::Broker::Memory(memory.clone()))
        .with_host("embedded");
    let state = Arc::new(AppState {
        placer: api::placement::Placer::for_settings(engine.clone(), &settings),
        orders: engine.clone(),
        monitor,
        console: Arc::new(console),
        ..AppState::new(db, &settings)?
    });
    let listener = TcpListener::bind(settings.api.listen.clone());
    tracing::info!(
        listen = %settings.api.listen,
        payment_delay_ms = settings.payment.delay_ms,
        success_rate = settings.payment.success_rate,
        sweep_interval_seconds = settings.expiration.sweep_interval_seconds,
        processing_timeout_seconds = settings.expiration.processing_timeout_seconds,
        "order-saga (embedded: SQLite + in-process transport) is up; Swagger UI at {}/swagger, operator console at {}/console",
        settings.api.public_url,
        settings.api.public_url
    );

    let timers = TimerWorker::new(
        engine.clone(),
        Duration::from_millis(settings.timers.poll_interval_ms),
    );
    let sweeper = SweepWorker::new(
        engine.clone(),
        Duration::from_secs(settings.expiration.sweep_interval_seconds),
    );
    let (server, saga_result, notification_result, (), (), ()) = tokio::join!(
        async {
            let stopped = stop.clone();
            let r = Server::new(listener)
                .run_with_graceful_shutdown(
                    api::app(state),
                    async move { stopped.cancelled().await },
                    Some(Duration::from_secs(settings.shutdown.grace_seconds)),
                )
                .await;
            stop.cancel();
            r
        },
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
        loops.run("timers", timers.run_until_stopped(stop.clone())),
        loops.run("expiration sweeps", sweeper.run_until_stopped(stop.clone())),
        loops.run("outbox relay", relay.run_until_stopped(stop.clone())),
    );
    memory.close();
    server.context("HTTP server failed")?;
    saga_result.context("order-saga consumer stopped")?;
    notification_result.context("notifications consumer stopped")?;
    tracing::info!("order-saga stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_urls_name_their_file() {
        assert_eq!(
            sqlite_file("sqlite://data/order-saga.db?mode=rwc"),
            Some(PathBuf::from("data/order-saga.db"))
        );
        assert_eq!(
            sqlite_file("sqlite:/tmp/x.db"),
            Some(PathBuf::from("/tmp/x.db"))
        );
        assert_eq!(sqlite_file("sqlite::memory:"), None);
        assert_eq!(sqlite_file("postgres://db/x"), None);
    }
}
