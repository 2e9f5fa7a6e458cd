//! What the services underneath can do, measured in the same run:
//! the database limit, the broker limit and the seed design.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::Utc;
use futures_util::StreamExt;
use indicatif::ProgressBar;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use orders::{Customer, Item, OrderSaga};
use rust_decimal::Decimal;
use saga::engine::SagaEngine;
use saga::testing::TestDatabase;
use sea_orm::sea_query::Value;
use sea_orm::sqlx::{self, Row};
use sea_orm::{ConnectOptions, ConnectionTrait, Database, Statement, TransactionTrait};
use sea_query_sqlx::SqlxValues;
use serde::Serialize;

use crate::stack::{add_products, product_for};
use crate::stats::{Latency, rate};

/// Ids that make the captured statements' parameters unambiguous: products,
/// orders and saga instances are numbered from different starts, so a
/// parameter equal to the captured order id can only be that order id.
const PRODUCT_IDS_FROM: i64 = 2_000_000_000;
const ORDER_IDS_FROM: i64 = 3_000_000_000;
const INSTANCE_IDS_FROM: i64 = 4_000_000_000;

/// One order's creation transaction, as `orders::place_items` issued it.
pub struct CapturedOrder {
    pub statements: Vec<Statement>,
    order_id: i64,
    instance_id: i64,
    product_id: i64,
}

/// A measured baseline.
#[derive(Clone, Debug, Serialize)]
pub struct Throughput {
    pub count: usize,
    pub seconds: f64,
    pub per_second: f64,
    pub latency: Option<Latency>,
}

/// Prepares `db` for the database baseline: distinct id ranges, a catalogue
/// and a customer. Returns the product ids and the customer.
pub async fn prepare_db(
    db: &TestDatabase,
    products: usize,
) -> anyhow::Result<(Vec<i64>, Customer)> {
    for (table, from) in [
        ("products", PRODUCT_IDS_FROM),
        ("orders", ORDER_IDS_FROM),
        ("saga_instances", INSTANCE_IDS_FROM),
    ] {
        db.db
            .execute_unprepared(&format!(
                "SELECT setval(pg_get_serial_sequence('{table}', 'id'), {from})"
            ))
            .await
            .with_context(|| format!("Failed to move the id sequence of {table}"))?;
    }
    let products = add_products(&db.db, products).await?;
    let row = db
        .db
        .query_one_raw(Statement::from_string(
            db.db.get_database_backend(),
            "INSERT INTO users (name, email, password_hash, role, created_at) \
             VALUES ('Bench', 'bench-db@example.com', 'not a hash', 'user', now()) RETURNING id",
        ))
        .await?
        .context("the user insert returned nothing")?;
    let customer = Customer {
        user_id: row.try_get("", "id")?,
        email: "bench-db@example.com".to_owned(),
        name: "Bench".to_owned(),
    };
    Ok((products, customer))
}

/// Runs `place_items` (what the API calls) once in a transaction and records every statement it
/// sends (SQL text and parameters) through sea-orm's metric callback.
pub async fn capture_place_items(
    url: &str,
    customer: &Customer,
    product_id: i64,
) -> anyhow::Result<CapturedOrder> {
    let mut options = ConnectOptions::new(url.to_owned());
    options.max_connections(1).sqlx_logging(false);
    let mut conn = Database::connect(options).await?;
    let captured: Arc<Mutex<Vec<Statement>>> = Arc::default();
    let sink = captured.clone();
    conn.set_metric_callback(move |info| {
        if let Ok(mut v) = sink.lock() {
            v.push(info.statement.clone());
        }
    });
    let txn = conn.begin().await?;
    let engine = SagaEngine::new(OrderSaga::default(), conn.clone());
    // What the API's `POST /api/orders` calls (its idempotency key aside).
    let item = Item {
        product_id,
        quantity: 1,
    };
    let placed = orders::place_items(&engine, &txn, customer, &[item], Decimal::MAX)
        .await
        .context("place_items failed while capturing its statements")?;
    txn.commit().await?;
    let statements = captured
        .lock()
        .map(|v| v.clone())
        .map_err(|_| anyhow::anyhow!("capture lock poisoned"))?;
    let instance = conn
        .query_one_raw(Statement::from_sql_and_values(
            conn.get_database_backend(),
            "SELECT id FROM saga_instances WHERE correlation_id = $1",
            [placed.order.id.to_string().into()],
        ))
        .await?
        .context("the captured order has no saga instance")?;
    let instance_id: i64 = instance.try_get("", "id")?;
    conn.close().await?;
    if placed.order.id <= ORDER_IDS_FROM || instance_id <= INSTANCE_IDS_FROM {
        bail!("the id sequences were not moved apart; cannot replay unambiguously");
    }
    Ok(CapturedOrder {
        statements,
        order_id: placed.order.id,
        instance_id,
        product_id,
    })
}

/// The ids of one replayed transaction so far.
#[derive(Default)]
struct ReplayIds {
    order_id: Option<i64>,
    instance_id: Option<i64>,
    uuids: HashMap<uuid::Uuid, uuid::Uuid>,
}

impl CapturedOrder {
    /// `v` with the captured order's ids replaced by this transaction's:
    /// product, order id (as number and as correlation id text), instance
    /// id, and each message id by a fresh one (the same fresh one wherever
    /// the captured id appeared).
    fn substitute(&self, v: &Value, product_id: i64, ids: &mut ReplayIds) -> Value {
        match v {
            Value::BigInt(Some(x)) if *x == self.product_id => Value::BigInt(Some(product_id)),
            Value::BigInt(Some(x)) if *x == self.order_id => Value::BigInt(ids.order_id),
            Value::BigInt(Some(x)) if *x == self.instance_id => Value::BigInt(ids.instance_id),
            Value::String(Some(s)) if *s == self.order_id.to_string() => {
                Value::String(ids.order_id.map(|o| o.to_string()))
            }
            // An array of ids as text (`{1,2,3}`, cast to `bigint[]`).
            Value::String(Some(s)) if s.starts_with('{') && s.ends_with('}') => {
                let ids: Vec<String> = s[1..s.len() - 1]
                    .split(',')
                    .map(|x| match x.parse::<i64>() {
                        Ok(x) if x == self.product_id => product_id.to_string(),
                        Ok(x) if x == self.order_id => ids.order_id.unwrap_or(x).to_string(),
                        Ok(x) if x == self.instance_id => ids.instance_id.unwrap_or(x).to_string(),
                        _ => x.to_owned(),
                    })
                    .collect();
                Value::String(Some(format!("{{{}}}", ids.join(","))))
            }
            // The engine's multi-row statements send their rows as one JSON
            // array (journal, outbox): the same ids, inside.
            Value::String(Some(s)) if s.starts_with('[') => {
                match serde_json::from_str::<serde_json::Value>(s) {
                    Ok(rows) => Value::String(Some(
                        self.substitute_json(&rows, product_id, ids).to_string(),
                    )),
                    Err(_) => v.clone(),
                }
            }
            Value::Uuid(Some(u)) => Value::Uuid(Some(
                *ids.uuids.entry(*u).or_insert_with(uuid::Uuid::new_v4),
            )),
            other => other.clone(),
        }
    }

    /// [`CapturedOrder::substitute`] inside a JSON parameter.
    fn substitute_json(
        &self,
        v: &serde_json::Value,
        product_id: i64,
        ids: &mut ReplayIds,
    ) -> serde_json::Value {
        use serde_json::Value as J;
        match v {
            J::Number(n) => match n.as_i64() {
                Some(x) if x == self.product_id => J::from(product_id),
                Some(x) if x == self.order_id => ids.order_id.map_or(J::Null, J::from),
                Some(x) if x == self.instance_id => ids.instance_id.map_or(J::Null, J::from),
                _ => v.clone(),
            },
            J::String(s) if *s == self.order_id.to_string() => {
                ids.order_id.map_or(J::Null, |o| J::String(o.to_string()))
            }
            J::String(s) => match s.parse::<uuid::Uuid>() {
                Ok(u) => J::String(
                    ids.uuids
                        .entry(u)
                        .or_insert_with(uuid::Uuid::new_v4)
                        .to_string(),
                ),
                Err(_) => v.clone(),
            },
            J::Array(items) => J::Array(
                items
                    .iter()
                    .map(|i| self.substitute_json(i, product_id, ids))
                    .collect(),
            ),
            J::Object(fields) => J::Object(
                fields
                    .iter()
                    .map(|(k, i)| (k.clone(), self.substitute_json(i, product_id, ids)))
                    .collect(),
            ),
            _ => v.clone(),
        }
    }

    /// Replays the transaction once on `pool` for product `product_id`.
    async fn replay(&self, pool: &sqlx::PgPool, product_id: i64) -> anyhow::Result<()> {
        let mut tx = pool.begin().await?;
        let mut ids = ReplayIds::default();
        for stmt in &self.statements {
            let values = stmt
                .values
                .as_ref()
                .map(|vs| {
                    sea_orm::sea_query::Values(
                        vs.0.iter()
                            .map(|v| self.substitute(v, product_id, &mut ids))
                            .collect(),
                    )
                })
                .unwrap_or_else(|| sea_orm::sea_query::Values(Vec::new()));
            let query =
                sqlx::query_with(sqlx::AssertSqlSafe(stmt.sql.as_str()), SqlxValues(values));
            if stmt.sql.starts_with("WITH wanted ") {
                // The stock reservation with the order and its items: one
                // row per reserved line, with the order's id.
                let row = query.fetch_one(&mut *tx).await?;
                let order_id: Option<i64> = row.try_get("order_id")?;
                ids.order_id = Some(order_id.context("the replayed order was not inserted")?);
            } else if stmt.sql.contains(" RETURNING ") {
                let row = query.fetch_one(&mut *tx).await?;
                if stmt.sql.starts_with("INSERT INTO \"orders\"") {
                    ids.order_id = Some(row.try_get("id")?);
                } else if stmt.sql.starts_with("INSERT INTO \"saga_instances\"")
                    || stmt.sql.starts_with("WITH ins ")
                {
                    ids.instance_id = Some(row.try_get("id")?);
                }
            } else {
                let done = query.execute(&mut *tx).await?;
                if stmt.sql.starts_with("UPDATE \"products\"") && done.rows_affected() != 1 {
                    bail!(
                        "replayed stock reservation updated {} rows",
                        done.rows_affected()
                    );
                }
            }
        }
        tx.commit().await?;
        Ok(())
    }
}

/// The database limit: `count` replays of the captured transaction from
/// `clients` concurrent connections, on sqlx directly.
pub async fn db_limit(
    url: &str,
    captured: &Arc<CapturedOrder>,
    products: &[i64],
    count: usize,
    clients: usize,
    progress: &ProgressBar,
) -> anyhow::Result<Throughput> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(clients as u32)
        .min_connections(clients as u32)
        .acquire_timeout(Duration::from_secs(30))
        .connect(url)
        .await
        .context("Failed to open the baseline's sqlx pool")?;
    let next = Arc::new(AtomicUsize::new(0));
    let products = Arc::new(products.to_vec());
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..clients {
        let (pool, next, products, captured, progress) = (
            pool.clone(),
            next.clone(),
            products.clone(),
            captured.clone(),
            progress.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return Ok::<_, anyhow::Error>(latencies);
                }
                let t0 = Instant::now();
                captured.replay(&pool, product_for(&products, i)).await?;
                latencies.push(t0.elapsed());
                progress.inc(1);
            }
        }));
    }
    let mut latencies = Vec::with_capacity(count);
    for worker in workers {
        latencies.extend(worker.await??);
    }
    let elapsed = started.elapsed();
    pool.close().await;
    Ok(Throughput {
        count,
        seconds: elapsed.as_secs_f64(),
        per_second: rate(count, elapsed),
        latency: Some(Latency::of(&latencies)),
    })
}

/// A durable queue of the bench's own on a fresh connection, deleted by [`BenchQueue::delete`].
struct BenchQueue {
    conn: Connection,
    name: String,
}

impl BenchQueue {
    async fn declare(url: &str, label: &str) -> anyhow::Result<Self> {
        let conn = Connection::connect(url, ConnectionProperties::default())
            .await
            .context("Failed to connect to RabbitMQ")?;
        let name = format!("bench.{}.{label}", uuid::Uuid::new_v4().simple());
        let channel = conn.create_channel().await?;
        channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("Failed to declare {name}"))?;
        Ok(Self { conn, name })
    }

    async fn delete(self) {
        if let Ok(channel) = self.conn.create_channel().await {
            let _ = channel
                .queue_delete(self.name.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = self.conn.close(200, "done".into()).await;
    }

    /// Publishes `count` persistent messages of `payload` with confirms,
    /// `window` in flight; returns when every one is confirmed.
    async fn publish(
        &self,
        count: usize,
        payload: &[u8],
        window: usize,
        progress: Option<&ProgressBar>,
    ) -> anyhow::Result<Duration> {
        let channel = self.conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let started = Instant::now();
        let mut in_flight = Vec::with_capacity(window);
        for i in 0..count {
            let confirm = channel
                .basic_publish(
                    "".into(),
                    self.name.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    payload,
                    BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_content_type("application/json".into()),
                )
                .await?;
            in_flight.push(confirm);
            if in_flight.len() == window || i + 1 == count {
                for confirm in in_flight.drain(..) {
                    let confirmation = tokio::time::timeout(Duration::from_secs(30), confirm)
                        .await
                        .context("no publisher confirm within 30 s")??;
                    if !confirmation.is_ack() {
                        bail!("the broker refused a message: {confirmation:?}");
                    }
                    if let Some(p) = progress {
                        p.inc(1);
                    }
                }
            }
        }
        let _ = channel.close(200, "done".into()).await;
        Ok(started.elapsed())
    }
}

/// A message the size of an `OrderCreated` envelope.
fn order_created_like() -> Vec<u8> {
    let payload = serde_json::json!({
        "message_id": uuid::Uuid::new_v4(), "message_type": "OrderCreated",
        "correlation_id": "3000000001", "causation_id": null,
        "occurred_at": Utc::now(), "initiated_by": 1,
        "payload": {"order_id": 3000000001_i64, "user_id": 1, "user_email": "bench@example.com",
            "user_name": "Bench", "total": "12.50",
            "items": [{"product_id": 2000000001_i64, "product_name": "bench product 1", "quantity": 1, "unit_price": "12.50"}],
            "previous_status": null, "status": "pending"}
    });
    payload.to_string().into_bytes()
}

/// Consumes `count` messages from `queue` with manual acks at `prefetch`,
/// holding each for `hold` before acknowledging it; returns the time from
/// the first delivery to the last ack.
async fn consume(
    conn: &Connection,
    queue: &str,
    count: usize,
    prefetch: u16,
    hold: Duration,
    progress: &ProgressBar,
) -> anyhow::Result<Duration> {
    let channel = conn.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut first: Option<Instant> = None;
    let mut handlers = Vec::new();
    let mut acked = 0usize;
    let acks = Arc::new(AtomicUsize::new(0));
    while acked < count {
        let delivery = tokio::time::timeout(Duration::from_secs(60), consumer.next())
            .await
            .context("no delivery within 60 s")?
            .context("the consumer stream ended")??;
        first.get_or_insert_with(Instant::now);
        acked += 1;
        if hold.is_zero() {
            delivery.ack(BasicAckOptions::default()).await?;
            progress.inc(1);
        } else {
            // The seed design: the handler sleeps inside its delivery slot.
            let (acks, progress) = (acks.clone(), progress.clone());
            handlers.push(tokio::spawn(async move {
                tokio::time::sleep(hold).await;
                let ok = delivery.ack(BasicAckOptions::default()).await;
                acks.fetch_add(1, Ordering::Relaxed);
                progress.inc(1);
                ok
            }));
        }
    }
    for handler in handlers {
        handler.await??;
    }
    let elapsed = first.map(|f| f.elapsed()).unwrap_or_default();
    let _ = channel.close(200, "done".into()).await;
    Ok(elapsed)
}

/// The broker limit: `count` persistent messages published with confirms
/// (`window` in flight) to a durable queue while a consumer takes them with
/// manual acks at `prefetch`. Throughput is messages over the time from the
/// first publish to the last ack; the publish side alone is reported too.
pub async fn broker_limit(
    url: &str,
    count: usize,
    prefetch: u16,
    window: usize,
    progress: &ProgressBar,
) -> anyhow::Result<(Throughput, Throughput)> {
    let queue = BenchQueue::declare(url, "broker").await?;
    let payload = order_created_like();
    let started = Instant::now();
    let result = tokio::try_join!(
        queue.publish(count, &payload, window, None),
        consume(
            &queue.conn,
            &queue.name,
            count,
            prefetch,
            Duration::ZERO,
            progress
        ),
    );
    let elapsed = started.elapsed();
    queue.delete().await;
    let (published, _) = result?;
    Ok((
        Throughput {
            count,
            seconds: elapsed.as_secs_f64(),
            per_second: rate(count, elapsed),
            latency: None,
        },
        Throughput {
            count,
            seconds: published.as_secs_f64(),
            per_second: rate(count, published),
            latency: None,
        },
    ))
}

/// The seed design: `count` orders queued, then a consumer at `prefetch`
/// whose handler sleeps `delay` per order before acknowledging (deciding) it.
pub async fn seed_design(
    url: &str,
    count: usize,
    prefetch: u16,
    delay: Duration,
    progress: &ProgressBar,
) -> anyhow::Result<Throughput> {
    let queue = BenchQueue::declare(url, "seed").await?;
    let result = async {
        queue
            .publish(count, &order_created_like(), 1000, None)
            .await?;
        consume(&queue.conn, &queue.name, count, prefetch, delay, progress).await
    }
    .await;
    queue.delete().await;
    let elapsed = result?;
    Ok(Throughput {
        count,
        seconds: elapsed.as_secs_f64(),
        per_second: rate(count, elapsed),
        latency: None,
    })
}
