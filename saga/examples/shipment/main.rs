//! # A second saga on the `saga` library: shipments
//!
//! A shipment saga, `requested -> allocated -> shipped | cancelled`, keyed by
//! a UUID, with its own table (`shipment_stock`, `shipment_allocations`), run
//! by the library's engine against the real PostgreSQL and RabbitMQ:
//!
//! - [`definition`]: the pure definition (states, inputs, the transition
//!   table, the `allocate` timer, the `ReleaseAllocation` compensation, the
//!   state timeout of `allocated`);
//! - [`hooks`]: its effectful half (allocating and releasing stock inside
//!   the engine's transaction);
//! - [`schema`]: its own migration, added after the saga tables';
//! - [`topology`]: its queues; this file: the wiring.
//!
//! The run starts the saga's consumer, a timer worker, a sweep worker and
//! the outbox relay (`run_until_stopped` each), then plays what other
//! services would send: seven `ShipmentRequested` (one of them twice) and,
//! depending on the shipment, `ShipmentDispatched` or `CancelShipment`. It
//! shows every path of the table:
//!
//! | shipment | what happens | ends |
//! |---|---|---|
//! | 2 widgets, 3 widgets | allocated at once, dispatched | shipped |
//! | 1 gadget (none in stock) | three failed attempts, 200 ms apart | cancelled |
//! | 2 gizmos | allocated, then `CancelShipment`: the compensation gives them back | cancelled |
//! | 4 widgets | allocated, never dispatched: the 1.5 s state timeout cancels it and gives them back | cancelled |
//! | 2 gadgets | one failed attempt, then `CancelShipment` cancels the pending timer | cancelled |
//! | 1 sprocket | one failed attempt, restocked, allocated at the second attempt, dispatched | shipped |
//!
//! It waits (polling, with a deadline) until every shipment is final and
//! every event it published came back from the broker, logs each
//! shipment's journal, prints a summary and the state diagram (Mermaid) on
//! stdout, stops the workers and exits 0, or 1 when anything did not end as
//! expected. It takes about two seconds.
//!
//! ```text
//! cargo run -p saga --example shipment
//! RUST_LOG=debug cargo run -p saga --example shipment     # more detail
//! ```
//!
//! `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`)
//! names the server; the example creates and migrates its own database,
//! `shipment_example`, next to the one named. `AMQP_URL` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`) names the broker; the example
//! declares its own exchange, `shipment_example.events`, and queues
//! `shipment_example.*`. Runs can be repeated: every run resets the stock and
//! uses new shipment ids.

mod definition;
mod hooks;
mod schema;
mod topology;

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use async_trait::async_trait;
use chrono::Utc;
use saga::clock::SystemClock;
use saga::consumer::{Consumer, HandlerOutcome, MessageHandler, RetryPolicy, SagaHandler};
use saga::engine::{EngineSettings, SagaEngine};
use saga::message::Envelope;
use saga::outbox::{OutboxHandle, OutboxRelay, RelaySettings};
use saga::retry::Attempts;
use saga::schema::transitions;
use saga::transport::rabbitmq::{QueueType, RabbitTransport, Topology};
use saga::transport::{OutgoingMessage, Transport};
use saga::workers::{SweepWorker, TimerWorker};
use saga::{Saga as _, SagaError, SagaState as _};
use sea_orm::{
    ColumnTrait, ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend,
    EntityTrait, QueryFilter, QueryOrder, Statement,
};
use sea_orm_migration::MigratorTrait as _;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::definition::{
    ShipmentEvent, ShipmentMessage, ShipmentRequest, ShipmentSaga, ShipmentState,
};
use crate::hooks::ShipmentHooks;
use crate::topology::{SHIPMENT_EVENTS_CONSUMER, SHIPMENT_SAGA_CONSUMER};

const DATABASE: &str = "shipment_example";
const EXCHANGE: &str = "shipment_example.events";
const QUEUE_PREFIX: &str = "shipment_example";
/// How long the whole play may take before the example gives up.
const DEADLINE: Duration = Duration::from_secs(30);

/// Stock at the start of every run.
const STOCK: [(&str, i32); 4] = [("WIDGET", 10), ("GIZMO", 3), ("GADGET", 0), ("SPROCKET", 0)];
/// Stock at the end, when everything went as planned: 2 + 3 widgets and 1
/// sprocket shipped, everything else given back.
const EXPECTED_STOCK: [(&str, i32); 4] =
    [("WIDGET", 5), ("GIZMO", 3), ("GADGET", 0), ("SPROCKET", 4)];

/// What the example does after requesting a shipment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Then {
    /// Dispatch it once it is allocated.
    Dispatch,
    /// Cancel it once it is allocated (the compensation releases the stock).
    CancelAllocated,
    /// Cancel it after its first failed attempt (the pending timer is cancelled).
    CancelWaiting,
    /// Restock after its first failed attempt, dispatch it once allocated.
    RestockAndDispatch,
    /// Nothing: it runs out of attempts, or out of time.
    Nothing,
}

struct Scenario {
    id: Uuid,
    what: &'static str,
    request: ShipmentRequest,
    then: Then,
    expected: ShipmentState,
    /// The triggers of its applied journal rows, in order.
    path: &'static [&'static str],
}

fn scenario(
    what: &'static str,
    sku: &str,
    quantity: i32,
    then: Then,
    expected: ShipmentState,
    path: &'static [&'static str],
) -> Scenario {
    Scenario {
        id: Uuid::new_v4(),
        what,
        request: ShipmentRequest {
            order_ref: format!("order-{}", short(Uuid::new_v4())),
            sku: sku.to_owned(),
            quantity,
        },
        then,
        expected,
        path,
    }
}

/// Every path of the transition table.
#[rustfmt::skip]
fn scenarios() -> Vec<Scenario> {
    use ShipmentState::{Cancelled, Shipped};
    use Then::*;
    const REQ: &str = "ShipmentRequested";
    const OK: &str = "Allocated";
    const FAIL: &str = "AllocationFailed";
    vec![
        scenario("in stock, dispatched", "WIDGET", 2, Dispatch, Shipped, &[REQ, OK, "ShipmentDispatched"]),
        scenario("in stock, dispatched", "WIDGET", 3, Dispatch, Shipped, &[REQ, OK, "ShipmentDispatched"]),
        scenario("never in stock", "GADGET", 1, Nothing, Cancelled, &[REQ, FAIL, FAIL, FAIL]),
        scenario("cancelled when allocated", "GIZMO", 2, CancelAllocated, Cancelled, &[REQ, OK, "CancelShipment"]),
        scenario("never dispatched", "WIDGET", 4, Nothing, Cancelled, &[REQ, OK, "AllocationExpired"]),
        scenario("cancelled while waiting", "GADGET", 2, CancelWaiting, Cancelled, &[REQ, FAIL, "CancelShipment"]),
        scenario("restocked, dispatched", "SPROCKET", 1, RestockAndDispatch, Shipped, &[REQ, FAIL, OK, "ShipmentDispatched"]),
    ]
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    // Logs go to stderr; stdout is the summary.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,lapin=warn,sqlx=warn".into()),
        )
        .init();
    let database_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| saga::testing::DEFAULT_DATABASE_URL.to_owned());
    let amqp_url =
        std::env::var("AMQP_URL").unwrap_or_else(|_| saga::testing::DEFAULT_AMQP_URL.to_owned());

    // Build: the database, the broker, the engine and its loops.
    let db = create_database(&database_url).await?;
    schema::Migrator::up(&db, None)
        .await
        .context("Failed to migrate the example's database")?;
    for (sku, units) in STOCK {
        schema::set_stock(&db, sku, units)
            .await
            .context("Failed to seed the stock")?;
    }
    let transport = RabbitTransport::connect(
        &amqp_url,
        EXCHANGE,
        Duration::from_secs(5),
        "shipment example",
    )
    .await
    .with_context(|| format!("Failed to connect to RabbitMQ at {amqp_url}"))?;
    transport
        .declare(&Topology {
            exchange: EXCHANGE.to_owned(),
            queue_type: QueueType::Classic,
            queues: topology::queues(QUEUE_PREFIX),
        })
        .await
        .context("Failed to declare the example's exchange and queues")?;
    let transport = Arc::new(transport);
    // The engine hands its committed events to the relay of this process.
    let outbox = OutboxHandle::new(RelaySettings::default().lease);
    let saga = ShipmentSaga {
        retry_delay: chrono::Duration::milliseconds(200),
        allocated_timeout: chrono::Duration::milliseconds(1500),
    };
    let retry = RetryPolicy {
        max_attempts: 5,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
    };
    let engine = SagaEngine::new(saga.clone(), db.clone())
        .with_hooks(ShipmentHooks)
        .with_outbox(outbox.clone())
        .with_settings(EngineSettings {
            retry: retry.clone(),
            ..EngineSettings::default()
        });
    let events = Arc::new(EventLog::default());
    let saga_consumer = Consumer::new(
        transport.clone(),
        topology::saga_queue(QUEUE_PREFIX),
        SHIPMENT_SAGA_CONSUMER,
        Arc::new(SagaHandler::new(engine.clone(), SHIPMENT_SAGA_CONSUMER)),
        retry.clone(),
        16,
    )
    // Up to 8 ready messages per transaction.
    .with_batch_size(8);
    let events_consumer = Consumer::new(
        transport.clone(),
        topology::events_queue(QUEUE_PREFIX),
        SHIPMENT_EVENTS_CONSUMER,
        events.clone(),
        retry,
        16,
    );
    let timers = TimerWorker::new(engine.clone(), Duration::from_millis(20));
    let sweeper = SweepWorker::new(engine.clone(), Duration::from_millis(100));
    let relay = OutboxRelay::new(
        db.clone(),
        transport.clone(),
        Arc::new(SystemClock),
        RelaySettings {
            poll_interval: Duration::from_millis(50),
            retry_after: chrono::Duration::milliseconds(100),
            ..RelaySettings::default()
        },
        outbox,
    );

    // Run until stopped.
    let stop = CancellationToken::new();
    let consuming = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let (a, b) = tokio::join!(
                saga_consumer.run_until_stopped(stop.clone()),
                events_consumer.run_until_stopped(stop.clone()),
            );
            a.and(b)
        })
    };
    let looping = {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::join!(
                timers.run_until_stopped(stop.clone()),
                sweeper.run_until_stopped(stop.clone()),
                relay.run_until_stopped(stop.clone()),
            );
        })
    };
    tracing::info!(
        database = DATABASE,
        exchange = EXCHANGE,
        "shipment saga running"
    );

    let scenarios = scenarios();
    let played = play(&scenarios, &engine, &transport, &db, &events).await;

    stop.cancel();
    let consumers = consuming.await.context("Failed to join the consumers")?;
    looping.await.context("Failed to join the workers")?;
    // The subscriptions hand back what they prefetched and close their
    // channels in the background: let them finish before the connection.
    let unsubscribed = until(
        tokio::time::Instant::now() + Duration::from_secs(5),
        "the subscriptions closed",
        || async {
            let status = transport.consumer_status();
            Ok(status.is_none_or(|s| {
                s.snapshots(std::time::Instant::now())
                    .iter()
                    .all(|c| !c.registered)
            }))
        },
    )
    .await;
    transport.close().await;
    unsubscribed?;
    consumers.context("A consumer stopped with an error")?;
    tracing::info!("workers stopped");
    if let Err(e) = played {
        tracing::error!("the play did not finish: {e:#}");
        return Ok(ExitCode::FAILURE);
    }

    let ok = report(&scenarios, &saga, &db, &events).await?;
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Sends what other services would, and waits until every shipment is
/// final and every event came back from the broker.
async fn play(
    scenarios: &[Scenario],
    engine: &SagaEngine<ShipmentSaga>,
    transport: &RabbitTransport,
    db: &DatabaseConnection,
    events: &EventLog,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut requests = Vec::new();
    for s in scenarios {
        let payload = serde_json::to_value(&s.request)?;
        requests.push(message(ShipmentMessage::ShipmentRequested, s.id, payload)?);
    }
    // The first request a second time, as a new message: the saga ignores it.
    if let Some(first) = scenarios.first() {
        let payload = serde_json::to_value(&first.request)?;
        requests.push(message(
            ShipmentMessage::ShipmentRequested,
            first.id,
            payload,
        )?);
    }
    publish(transport, &requests).await?;

    let follow_ups = scenarios.iter().map(|s| async move {
        let state = |want: ShipmentState| async move {
            let instance = engine.instance(&s.id.to_string()).await?;
            Ok::<_, SagaError>(instance.is_some_and(|i| i.state == want))
        };
        let failed_once = || async move {
            Ok::<_, SagaError>(
                journal(db, s.id)
                    .await?
                    .iter()
                    .any(|row| row.trigger == "AllocationFailed"),
            )
        };
        match s.then {
            Then::Dispatch => {
                until(deadline, "allocated", || state(ShipmentState::Allocated)).await?;
                publish(
                    transport,
                    &[message(
                        ShipmentMessage::ShipmentDispatched,
                        s.id,
                        serde_json::Value::Null,
                    )?],
                )
                .await
            }
            Then::CancelAllocated => {
                until(deadline, "allocated", || state(ShipmentState::Allocated)).await?;
                publish(
                    transport,
                    &[message(
                        ShipmentMessage::CancelShipment,
                        s.id,
                        serde_json::Value::Null,
                    )?],
                )
                .await
            }
            Then::CancelWaiting => {
                until(deadline, "a failed attempt", failed_once).await?;
                publish(
                    transport,
                    &[message(
                        ShipmentMessage::CancelShipment,
                        s.id,
                        serde_json::Value::Null,
                    )?],
                )
                .await
            }
            Then::RestockAndDispatch => {
                until(deadline, "a failed attempt", failed_once).await?;
                schema::set_stock(db, &s.request.sku, 5).await?;
                tracing::info!(sku = %s.request.sku, units = 5, "restocked");
                until(deadline, "allocated", || state(ShipmentState::Allocated)).await?;
                publish(
                    transport,
                    &[message(
                        ShipmentMessage::ShipmentDispatched,
                        s.id,
                        serde_json::Value::Null,
                    )?],
                )
                .await
            }
            Then::Nothing => Ok(()),
        }
    });
    for result in futures_util::future::join_all(follow_ups).await {
        result?;
    }

    until(deadline, "every shipment final", || async {
        for s in scenarios {
            let instance = engine.instance(&s.id.to_string()).await?;
            if !instance.is_some_and(|i| i.state.is_final()) {
                return Ok(false);
            }
        }
        Ok::<_, SagaError>(true)
    })
    .await?;
    let published = count_published(db, scenarios).await?;
    until(deadline, "every event back from the broker", || async {
        Ok::<_, SagaError>(events.len() >= published)
    })
    .await?;
    Ok(())
}

/// Logs every shipment's journal, prints the summary and the diagram;
/// `true` when everything ended as expected.
async fn report(
    scenarios: &[Scenario],
    saga: &ShipmentSaga,
    db: &DatabaseConnection,
    events: &EventLog,
) -> anyhow::Result<bool> {
    let mut ok = true;
    let mut lines = Vec::new();
    for s in scenarios {
        let rows = journal(db, s.id).await?;
        for row in &rows {
            tracing::info!(
                shipment = %short(s.id),
                from = row.from_state.as_deref().unwrap_or("-"),
                to = %row.to_state,
                trigger = %row.trigger,
                outcome = %row.outcome,
                input = %row.input.as_ref().map(|i| i.to_string()).unwrap_or_default(),
                detail = row.detail.as_deref().unwrap_or(""),
                "journal"
            );
        }
        let state = rows.last().map_or("-", |r| r.to_state.as_str());
        let path: Vec<&str> = rows
            .iter()
            .filter(|r| r.outcome == "applied")
            .map(|r| r.trigger.as_str())
            .collect();
        let ignored_requests = rows
            .iter()
            .filter(|r| r.outcome == "ignored" && r.trigger == "ShipmentRequested")
            .count();
        // The first shipment was requested twice; the second request is ignored.
        let duplicates_ok = ignored_requests == usize::from(s.id == scenarios[0].id);
        let fine = state == s.expected.name() && path == s.path && duplicates_ok;
        ok &= fine;
        lines.push(format!(
            "{:<10} {:<26} {:<12} {:<10} {} {}",
            short(s.id),
            s.what,
            format!("{} x{}", s.request.sku, s.request.quantity),
            state,
            if fine { "yes" } else { "NO " },
            path.join(" -> "),
        ));
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "\n{:<10} {:<26} {:<12} {:<10} ok  path (applied inputs)",
        "shipment", "scenario", "request", "state"
    )?;
    for line in lines {
        writeln!(out, "{line}")?;
    }
    if let Some(first) = scenarios.first() {
        writeln!(
            out,
            "({} was requested twice: its journal has the second request as ignored)",
            short(first.id)
        )?;
    }
    writeln!(out, "\n{:<10} {:>9} {:>9}", "sku", "available", "expected")?;
    for (sku, expected) in EXPECTED_STOCK {
        let available = schema::available(db, sku).await?;
        ok &= available == expected;
        writeln!(out, "{sku:<10} {available:>9} {expected:>9}")?;
    }
    let mut received: HashMap<String, usize> = HashMap::new();
    for (_, message_type) in events.received() {
        *received.entry(message_type).or_default() += 1;
    }
    let expected_events = [
        ("ShipmentAllocated", 5),
        ("ShipmentShipped", 3),
        ("ShipmentCancelled", 4),
    ];
    writeln!(out, "\n{:<18} {:>8} {:>9}", "event", "received", "expected")?;
    for (event, expected) in expected_events {
        let got = received.get(event).copied().unwrap_or(0);
        ok &= got == expected;
        writeln!(out, "{event:<18} {got:>8} {expected:>9}")?;
    }
    writeln!(out, "\n```mermaid\n{}```", saga::describe::mermaid(saga))?;
    writeln!(
        out,
        "\n{}",
        if ok {
            "every shipment ended as expected"
        } else {
            "SOMETHING DID NOT END AS EXPECTED"
        }
    )?;
    Ok(ok)
}

/// Creates the example's database next to the one `server_url` names, if
/// it is missing, and connects to it. Race-free: when two runs create it at
/// once, the loser's `CREATE DATABASE` fails (`42P04`, or `23505` on
/// `pg_database`) and the database exists, which is all it wanted.
async fn create_database(server_url: &str) -> anyhow::Result<DatabaseConnection> {
    let admin_url = saga::testing::with_database(server_url, "postgres");
    let admin = Database::connect(quiet(&admin_url))
        .await
        .with_context(|| format!("Failed to connect to PostgreSQL at {admin_url}"))?;
    if !database_exists(&admin).await? {
        let created = admin
            .execute_unprepared(&format!("CREATE DATABASE \"{DATABASE}\""))
            .await;
        match created {
            Ok(_) => tracing::info!(database = DATABASE, "database created"),
            Err(_) if database_exists(&admin).await? => {}
            Err(e) => return Err(e).context("Failed to create the example's database"),
        }
    }
    admin
        .close()
        .await
        .context("Failed to close the admin connection")?;
    let url = saga::testing::with_database(server_url, DATABASE);
    Database::connect(quiet(&url))
        .await
        .with_context(|| format!("Failed to connect to {url}"))
}

async fn database_exists(admin: &DatabaseConnection) -> anyhow::Result<bool> {
    let row = admin
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT 1 FROM pg_database WHERE datname = $1",
            [DATABASE.into()],
        ))
        .await
        .context("Failed to look for the example's database")?;
    Ok(row.is_some())
}

fn quiet(url: &str) -> ConnectOptions {
    let mut options = ConnectOptions::new(url.to_owned());
    options.max_connections(8).sqlx_logging(false);
    options
}

/// A message another service would publish about shipment `id`.
fn message(
    kind: ShipmentMessage,
    id: Uuid,
    payload: serde_json::Value,
) -> anyhow::Result<OutgoingMessage> {
    let envelope = Envelope {
        message_id: Uuid::new_v4(),
        message_type: kind.message_type().to_owned(),
        correlation_id: id.to_string(),
        causation_id: None,
        occurred_at: Utc::now(),
        initiated_by: None,
        payload,
    };
    Ok(OutgoingMessage {
        message_id: envelope.message_id,
        message_type: envelope.message_type.clone(),
        correlation_id: envelope.correlation_id.clone(),
        routing_key: kind.routing_key().to_owned(),
        body: serde_json::to_vec(&envelope)?,
        trace: None,
    })
}

/// Publishes with confirms; every message must be confirmed.
async fn publish(transport: &RabbitTransport, messages: &[OutgoingMessage]) -> anyhow::Result<()> {
    for (message, confirmed) in messages.iter().zip(transport.publish(messages).await?) {
        confirmed.with_context(|| format!("{} was not confirmed", message.message_type))?;
        tracing::info!(
            shipment = %message.correlation_id,
            message_type = %message.message_type,
            "published"
        );
    }
    Ok(())
}

/// Polls `check` every 25 ms until it says yes, or fails at `deadline`.
async fn until<F, Fut>(
    deadline: tokio::time::Instant,
    what: &str,
    mut check: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool, SagaError>>,
{
    loop {
        if check().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The shipment's journal, oldest first.
async fn journal(db: &DatabaseConnection, id: Uuid) -> Result<Vec<transitions::Model>, SagaError> {
    Ok(transitions::Entity::find()
        .filter(transitions::Column::SagaType.eq(ShipmentSaga::TYPE))
        .filter(transitions::Column::CorrelationId.eq(id.to_string()))
        .order_by_asc(transitions::Column::Id)
        .all(db)
        .await?)
}

/// How many events the saga queued for these shipments.
async fn count_published(db: &DatabaseConnection, scenarios: &[Scenario]) -> anyhow::Result<usize> {
    use sea_orm::PaginatorTrait as _;
    let ids: Vec<String> = scenarios.iter().map(|s| s.id.to_string()).collect();
    let types: Vec<&str> = ShipmentEvent::ALL
        .iter()
        .map(saga::SagaEvent::message_type)
        .collect();
    let count = saga::schema::outbox::Entity::find()
        .filter(saga::schema::outbox::Column::CorrelationId.is_in(ids))
        .filter(saga::schema::outbox::Column::MessageType.is_in(types))
        .count(db)
        .await?;
    Ok(usize::try_from(count)?)
}

fn short(id: Uuid) -> String {
    id.simple().to_string()[..8].to_owned()
}

/// The consumer of the saga's events: what another service would be. It
/// keeps what it received in memory (a real one would keep an inbox in
/// its database, as the saga's consumer does).
#[derive(Default)]
struct EventLog {
    received: Mutex<Received>,
}

#[derive(Default)]
struct Received {
    /// Message ids seen (the inbox).
    ids: HashSet<Uuid>,
    /// (shipment, message type), in arrival order.
    events: Vec<(String, String)>,
}

impl EventLog {
    fn received(&self) -> Vec<(String, String)> {
        self.received
            .lock()
            .map(|r| r.events.clone())
            .unwrap_or_default()
    }

    fn len(&self) -> usize {
        self.received
            .lock()
            .map(|r| r.events.len())
            .unwrap_or_default()
    }
}

#[async_trait]
impl MessageHandler for EventLog {
    async fn handle(&self, envelope: &Envelope) -> Result<HandlerOutcome, SagaError> {
        let mut received = self
            .received
            .lock()
            .map_err(|_| SagaError::Corrupt("event log lock poisoned".to_owned()))?;
        if !received.ids.insert(envelope.message_id) {
            return Ok(HandlerOutcome::Duplicate);
        }
        received.events.push((
            envelope.correlation_id.clone(),
            envelope.message_type.clone(),
        ));
        tracing::info!(
            shipment = %envelope.correlation_id,
            message_type = %envelope.message_type,
            state = envelope.payload["state"].as_str().unwrap_or(""),
            "event received"
        );
        Ok(HandlerOutcome::Done)
    }

    async fn record_failure(&self, _: &Envelope, _: &SagaError) -> Result<Attempts, SagaError> {
        // Nothing above can fail for long: give up on the message at once.
        Ok(Attempts {
            spent: 1,
            exhausted: true,
        })
    }
}
