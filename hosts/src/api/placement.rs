//! Placing orders: the `POST /api/orders` requests that wait at the same
//! time share one transaction (group commit).
//!
//! Each request hands its order to a queue and waits for the answer.
//! `api.order_batch_workers` workers take orders off the queue: a worker takes
//! the first one waiting, and with it whatever else is waiting then, up to
//! `api.order_batch_max`; it never waits for more to arrive, so a lone
//! request goes through at once. A batch is placed in ONE transaction: on
//! PostgreSQL the products of all its orders are locked first, in id order
//! (so two batches, or a batch and the runner's stock release, cannot
//! deadlock), then each order is placed and its `Idempotency-Key` recorded
//! exactly as a lone request would, then one commit, and the `OrderCreated`
//! events go to the relay.
//!
//! If anything in a batch fails (a product unknown or out of stock, a key
//! that an earlier request holds, a database error), the batch is rolled
//! back and each of its orders is placed again in a transaction of its own,
//! so an order is answered exactly as it would have been alone and no order
//! is held back by another's error beyond that one retry.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use ::orders::{Customer, Item, OrderError, OrderSaga, PlacedOrder};
use chrono::{DateTime, Utc};
use poem_openapi::types::ToJSON as _;
use saga::SagaEngine;
use saga::outbox::Committed;
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, Statement,
    TransactionTrait,
};
use tokio::sync::{Mutex, mpsc, oneshot};
use tracing::Instrument;
use uuid::Uuid;

use super::money::Money;
use super::orders::{OrderView, earlier_use, placed_view, record_key};
use super::problem::ApiError;

/// Counter: transactions that placed orders, by `kind` (`batch`: several
/// orders in one; `single`: one order; `retry`: one order of a batch that
/// failed, placed again alone).
pub const ORDER_TRANSACTIONS: &str = "api_order_transactions_total";
/// Counter: orders placed (committed) by the API.
pub const ORDERS_PLACED: &str = "api_orders_placed_total";
/// Gauge: orders handed to the workers whose requests wait for an answer.
pub const ORDERS_PENDING: &str = "api_orders_pending";

/// Describes this module's metrics (called once, by `crate::metrics`).
pub fn describe_metrics() {
    metrics::describe_counter!(
        ORDER_TRANSACTIONS,
        "Transactions that placed orders: batch (several orders), single, retry (an order of a failed batch, alone)"
    );
    metrics::describe_counter!(ORDERS_PLACED, "Orders placed (committed) by the API");
    metrics::describe_gauge!(
        ORDERS_PENDING,
        "Orders handed to the placement workers whose requests wait for an answer"
    );
}

/// How long an `Idempotency-Key` is remembered (`api.idempotency_ttl_seconds`).
pub fn idempotency_ttl(settings: &crate::settings::Settings) -> chrono::Duration {
    chrono::Duration::seconds(
        i64::try_from(settings.api.idempotency_ttl_seconds).unwrap_or(i64::MAX / 1000),
    )
}

/// One order to place, as the request handler prepared it.
pub struct NewOrder {
    /// Who places it.
    pub customer: Customer,
    /// Its lines: distinct products (the handler adds repeated ones up).
    pub items: Vec<Item>,
    /// The request's `Idempotency-Key`, if it had one.
    pub key: Option<String>,
    /// The request body's fingerprint, stored with the key.
    pub fingerprint: String,
    /// When the request came in.
    pub now: DateTime<Utc>,
    /// The request's span: the order is placed in it, so the saga instance
    /// and its `OrderCreated` message keep the request's trace.
    pub span: tracing::Span,
}

/// What became of an order.
pub enum Outcome {
    /// Placed and committed; its events are with the relay.
    Created { view: OrderView, message_id: Uuid },
    /// An earlier request with the same key and body was answered this.
    Replay(OrderView),
    /// Refused by the catalogue (unknown product, stock, total): nothing
    /// was kept.
    Rejected(OrderError),
}

struct Job {
    order: NewOrder,
    reply: oneshot::Sender<Result<Outcome, ApiError>>,
}

/// What the workers share.
struct Shared {
    db: DatabaseConnection,
    engine: SagaEngine<OrderSaga>,
    idempotency_ttl: chrono::Duration,
    batch_max: usize,
}

/// The queue of orders to place, and its workers (tokio tasks, which end
/// when the last [`Placer`] is dropped).
pub struct Placer {
    queue: mpsc::Sender<Job>,
    /// Orders handed in and not answered yet.
    pending: Arc<AtomicUsize>,
}

/// Counts an order as pending while it lives.
struct PendingGuard(Arc<AtomicUsize>);

impl PendingGuard {
    fn new(pending: &Arc<AtomicUsize>) -> Self {
        let now = pending.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::gauge!(ORDERS_PENDING).set(now as f64);
        Self(pending.clone())
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        let now = self.0.fetch_sub(1, Ordering::Relaxed).saturating_sub(1);
        metrics::gauge!(ORDERS_PENDING).set(now as f64);
    }
}

impl Placer {
    /// Starts the workers of `settings` (`api.order_batch_workers`, each
    /// taking up to `api.order_batch_max` orders at a time) on `engine`'s
    /// database. Must be called inside a tokio runtime.
    pub fn for_settings(
        engine: SagaEngine<OrderSaga>,
        settings: &crate::settings::Settings,
    ) -> Self {
        Self::start(
            engine,
            idempotency_ttl(settings),
            settings.api.order_batch_workers as usize,
            settings.api.order_batch_max,
        )
    }

    /// Starts `workers` workers taking up to `batch_max` orders at a time.
    /// Must be called inside a tokio runtime.
    pub fn start(
        engine: SagaEngine<OrderSaga>,
        idempotency_ttl: chrono::Duration,
        workers: usize,
        batch_max: usize,
    ) -> Self {
        let workers = workers.max(1);
        let batch_max = batch_max.max(1);
        let (queue, receiver) = mpsc::channel(workers * batch_max * 2);
        let receiver = Arc::new(Mutex::new(receiver));
        let shared = Arc::new(Shared {
            db: engine.db().clone(),
            engine,
            idempotency_ttl,
            batch_max,
        });
        for _ in 0..workers {
            tokio::spawn(work(shared.clone(), receiver.clone()));
        }
        Self {
            queue,
            pending: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Orders handed in whose requests wait for their answer.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// Places `order`, in a batch with whatever other orders are waiting.
    pub async fn place(&self, order: NewOrder) -> Result<Outcome, ApiError> {
        let _pending = PendingGuard::new(&self.pending);
        let (reply, answer) = oneshot::channel();
        let unavailable = || {
            ApiError::internal(
                "order placement",
                &std::io::Error::other("the placement workers have stopped"),
            )
        };
        self.queue
            .send(Job { order, reply })
            .await
            .map_err(|_| unavailable())?;
        answer.await.map_err(|_| unavailable())?
    }
}

/// A worker: takes a batch, places it, answers its requests.
async fn work(shared: Arc<Shared>, receiver: Arc<Mutex<mpsc::Receiver<Job>>>) {
    loop {
        let mut jobs = Vec::new();
        {
            let mut receiver = receiver.lock().await;
            match receiver.recv().await {
                Some(job) => jobs.push(job),
                None => return,
            }
            while jobs.len() < shared.batch_max {
                match receiver.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
        }
        // A request that went away before its order was taken (the client
        // disconnected, or the server stopped waiting) places nothing.
        jobs.retain(|job| !job.reply.is_closed());
        if jobs.len() > 1 {
            match place_batch(&shared, &jobs).await {
                Ok(placed) => {
                    metrics::counter!(ORDER_TRANSACTIONS, "kind" => "batch").increment(1);
                    metrics::counter!(ORDERS_PLACED).increment(placed.len() as u64);
                    for (job, (view, message_id, events)) in jobs.into_iter().zip(placed) {
                        shared.engine.committed(events);
                        // The request may have gone: its order stays placed.
                        let _ = job.reply.send(Ok(Outcome::Created { view, message_id }));
                    }
                    continue;
                }
                Err(e) => {
                    tracing::debug!(
                        orders = jobs.len(),
                        error = %e,
                        "a batch of orders failed; placing each alone"
                    );
                }
            }
        }
        let kind = if jobs.len() > 1 { "retry" } else { "single" };
        for job in jobs {
            let outcome = place_one(&shared, &job.order).await;
            metrics::counter!(ORDER_TRANSACTIONS, "kind" => kind).increment(1);
            if matches!(outcome, Ok(Outcome::Created { .. })) {
                metrics::counter!(ORDERS_PLACED).increment(1);
            }
            let _ = job.reply.send(outcome);
        }
    }
}

/// Why a batch was given up (then each order is placed alone).
#[derive(Debug, thiserror::Error)]
enum BatchFailed {
    #[error("{0}")]
    Db(#[from] sea_orm::DbErr),
    #[error("{0}")]
    Order(#[from] OrderError),
    #[error("{0:?}")]
    Api(ApiError),
    #[error("an earlier request holds an Idempotency-Key of the batch")]
    KeyTaken,
}

/// Places every order of `jobs` in one transaction; on any failure nothing
/// is kept.
async fn place_batch(
    shared: &Shared,
    jobs: &[Job],
) -> Result<Vec<(OrderView, Uuid, Vec<Committed>)>, BatchFailed> {
    let txn = shared.db.begin().await?;
    match place_all(shared, &txn, jobs).await {
        Ok(placed) => {
            txn.commit().await?;
            Ok(placed)
        }
        Err(e) => {
            txn.rollback().await?;
            Err(e)
        }
    }
}

async fn place_all(
    shared: &Shared,
    txn: &DatabaseTransaction,
    jobs: &[Job],
) -> Result<Vec<(OrderView, Uuid, Vec<Committed>)>, BatchFailed> {
    let orders: Vec<(Customer, Vec<Item>, tracing::Span)> = jobs
        .iter()
        .map(|j| {
            (
                j.order.customer.clone(),
                j.order.items.clone(),
                j.order.span.clone(),
            )
        })
        .collect();
    let placed = ::orders::place_many(&shared.engine, txn, &orders, Money::max()).await?;
    let mut done = Vec::with_capacity(jobs.len());
    for placed in placed {
        let view = placed_view(&placed).map_err(BatchFailed::Api)?;
        done.push((view, placed.message_id, placed.events));
    }
    let mut keys: Vec<KeyRow<'_>> = jobs
        .iter()
        .zip(&done)
        .filter_map(|(job, (view, _, _))| {
            job.order.key.as_deref().map(|key| KeyRow {
                user_id: job.order.customer.user_id,
                key,
                fingerprint: &job.order.fingerprint,
                view,
                now: job.order.now,
            })
        })
        .collect();
    // In one order in every batch: two batches holding each other's key
    // would otherwise deadlock (and both be placed again alone).
    keys.sort_by(|a, b| (a.user_id, a.key).cmp(&(b.user_id, b.key)));
    if txn.get_database_backend() == DbBackend::Postgres {
        if !keys.is_empty() && record_keys(txn, &keys, shared.idempotency_ttl).await? < keys.len() {
            return Err(BatchFailed::KeyTaken);
        }
    } else {
        for k in &keys {
            let recorded = record_key(
                txn,
                k.user_id,
                k.key,
                k.fingerprint,
                k.view,
                k.now,
                shared.idempotency_ttl,
            )
            .await
            .map_err(BatchFailed::Api)?;
            if !recorded {
                return Err(BatchFailed::KeyTaken);
            }
        }
    }
    Ok(done)
}

/// An `Idempotency-Key` to record for an order of a batch.
struct KeyRow<'a> {
    user_id: i64,
    key: &'a str,
    fingerprint: &'a str,
    view: &'a OrderView,
    now: DateTime<Utc>,
}

/// Records the keys of a batch's orders with their responses in one
/// statement (PostgreSQL), as `record_key` does one: a key is taken if it is new or its earlier use
/// expired. Returns how many were recorded (fewer than `keys`: an earlier
/// request holds one; a key twice in `keys` is an error).
async fn record_keys(
    txn: &DatabaseTransaction,
    keys: &[KeyRow<'_>],
    ttl: chrono::Duration,
) -> Result<usize, BatchFailed> {
    let micros = |at: DateTime<Utc>| at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let rows: Vec<serde_json::Value> = keys
        .iter()
        .map(|k| {
            serde_json::json!({
                "user_id": k.user_id,
                "key": k.key,
                "fingerprint": k.fingerprint,
                "created_at": micros(k.now),
                "expires_at": micros(k.now + ttl),
                "body": k.view.to_json(),
                "order_id": k.view.id,
            })
        })
        .collect();
    let sql = "INSERT INTO idempotency_keys (user_id, key, request_fingerprint, created_at, \
         expires_at, response_status, response_body, order_id) \
         SELECT (r->>'user_id')::bigint, r->>'key', r->>'fingerprint', \
         (r->>'created_at')::timestamptz, (r->>'expires_at')::timestamptz, 201, r->'body', \
         (r->>'order_id')::bigint \
         FROM jsonb_array_elements($1::text::jsonb) WITH ORDINALITY AS t(r, n) ORDER BY n \
         ON CONFLICT (user_id, key) DO UPDATE SET \
         request_fingerprint = EXCLUDED.request_fingerprint, created_at = EXCLUDED.created_at, \
         expires_at = EXCLUDED.expires_at, response_status = EXCLUDED.response_status, \
         response_body = EXCLUDED.response_body, order_id = EXCLUDED.order_id \
         WHERE idempotency_keys.expires_at <= EXCLUDED.created_at";
    let result = txn
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            sql,
            [serde_json::Value::Array(rows).to_string().into()],
        ))
        .await?;
    Ok(usize::try_from(result.rows_affected()).unwrap_or(usize::MAX))
}

/// `orders::place_items` for `order`, in its request's span.
async fn place_in(
    shared: &Shared,
    txn: &DatabaseTransaction,
    order: &NewOrder,
) -> Result<PlacedOrder, OrderError> {
    ::orders::place_items(
        &shared.engine,
        txn,
        &order.customer,
        &order.items,
        Money::max(),
    )
    .instrument(order.span.clone())
    .await
}

/// Places one order in a transaction of its own.
async fn place_one(shared: &Shared, order: &NewOrder) -> Result<Outcome, ApiError> {
    let txn = shared.db.begin().await?;
    let placed = match place_in(shared, &txn, order).await {
        Ok(placed) => placed,
        Err(e) => {
            txn.rollback().await?;
            // A retry of a request that was answered before gets that
            // answer, even when the catalogue has changed since.
            if let Some(key) = &order.key
                && let Some(view) = earlier(shared, order, key).await?
            {
                return Ok(Outcome::Replay(view));
            }
            return Ok(Outcome::Rejected(e));
        }
    };
    let view = placed_view(&placed)?;
    if let Some(key) = &order.key
        && !record_key(
            &txn,
            order.customer.user_id,
            key,
            &order.fingerprint,
            &view,
            order.now,
            shared.idempotency_ttl,
        )
        .await?
    {
        // An earlier request holds the key: nothing of this one is kept.
        txn.rollback().await?;
        return match earlier(shared, order, key).await? {
            Some(view) => Ok(Outcome::Replay(view)),
            None => Err(ApiError::conflict(
                "a request with this Idempotency-Key is being processed; retry",
                Some("Idempotency-Key"),
            )),
        };
    }
    txn.commit().await?;
    // The OrderCreated event leaves at once through this process's relay.
    shared.engine.committed(placed.events);
    Ok(Outcome::Created {
        view,
        message_id: placed.message_id,
    })
}

/// What an earlier request with `order`'s key was answered, if any.
async fn earlier(
    shared: &Shared,
    order: &NewOrder,
    key: &str,
) -> Result<Option<OrderView>, ApiError> {
    earlier_use(
        &shared.db,
        order.customer.user_id,
        key,
        &order.fingerprint,
        order.now,
    )
    .await
}
