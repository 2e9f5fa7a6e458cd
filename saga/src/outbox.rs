//! The transactional outbox and its relay.
//!
//! Events are written to `saga_outbox` in the same transaction as the state
//! change that caused them, **leased** to the process that wrote them
//! (`locked_until` a short lease ahead). Right after the commit the writer
//! hands them to its relay ([`OutboxHandle::committed`]), which publishes
//! them at once with publisher confirms and marks them sent: an event leaves
//! without waiting for a poll and without a claim transaction.
//!
//! The relay also polls: it claims unsent rows whose lease is free or
//! expired (`FOR UPDATE SKIP LOCKED`, so several relays can run), publishes
//! them and marks them sent. That is the safety net: events of a process that
//! died (`kill -9`) between commit and publish go out as soon as their short
//! lease expires, within seconds. While a relay waits for the broker it
//! renews the leases of the rows it holds, so a slow broker does not make
//! another relay publish them too. No database transaction is held while
//! waiting for the broker. A relay that dies after publishing but before
//! marking leaves the lease to expire: the row is published again and the
//! consumers' inbox drops the duplicate (at-least-once + idempotency).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, Utc};
use sea_orm::sea_query::{Expr, ExprTrait as _, LockBehavior, LockType, Query};
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait,
    PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, Statement, TransactionTrait,
};
use serde_json::value::RawValue;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::clock::Clock;
use crate::error::SagaError;
use crate::message::Envelope;
use crate::schema::outbox as saga_outbox;
use crate::trace::{self, TraceContext};
use crate::transport::{OutgoingMessage, Transport};

/// Most events waiting in a handle for the relay; more are left to the
/// relay's poll (their lease expires and they are claimed like any row).
const HANDLE_CAPACITY: usize = 20_000;

/// An event written to the outbox, as its writer hands it to the relay
/// after the commit.
#[derive(Clone, Debug)]
pub struct Committed {
    /// The envelope's id (`saga_outbox.message_id`).
    pub message_id: Uuid,
    /// The envelope's type.
    pub message_type: String,
    /// The saga instance's correlation id.
    pub correlation_id: String,
    /// Where the exchange routes it.
    pub routing_key: String,
    /// The envelope as JSON bytes.
    pub body: Vec<u8>,
    /// The trace context stored with the row.
    pub trace: Option<TraceContext>,
}

/// One event to write into the outbox.
#[derive(Clone, Debug)]
pub struct NewEvent {
    /// The envelope.
    pub envelope: Envelope,
    /// Its routing key.
    pub routing_key: String,
    /// The trace context of the span that caused it.
    pub trace: Option<TraceContext>,
}

/// How writers reach the relay of their process: the lease they write their
/// events with, and a queue of committed events the relay publishes at once.
/// Cheap to clone (shared).
#[derive(Clone)]
pub struct OutboxHandle {
    inner: Arc<HandleInner>,
}

struct HandleInner {
    lease: Duration,
    signal: Notify,
    queue: Mutex<VecDeque<Committed>>,
}

impl Default for OutboxHandle {
    /// A handle whose writers do not lease their events: any relay may
    /// publish them at once (an engine without a relay in its process).
    fn default() -> Self {
        Self::new(Duration::zero())
    }
}

impl OutboxHandle {
    /// A handle whose writers lease their events for `lease` (to the relay
    /// that shares this handle); a zero lease leaves them free for any relay.
    pub fn new(lease: Duration) -> Self {
        Self {
            inner: Arc::new(HandleInner {
                lease,
                signal: Notify::new(),
                queue: Mutex::new(VecDeque::new()),
            }),
        }
    }

    /// How long a writer's lease on its new events lasts.
    pub fn lease(&self) -> Duration {
        self.inner.lease
    }

    /// Until when events written at `now` are leased, if they are.
    pub fn leased_until(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        (self.inner.lease > Duration::zero()).then(|| now + self.inner.lease)
    }

    /// Hands events whose transaction committed to the relay (call right
    /// after the commit). Events beyond the handle's capacity are left to
    /// the relay's poll.
    pub fn committed(&self, events: impl IntoIterator<Item = Committed>) {
        let mut any = false;
        if let Ok(mut queue) = self.inner.queue.lock() {
            for event in events {
                if queue.len() >= HANDLE_CAPACITY {
                    break;
                }
                queue.push_back(event);
                any = true;
            }
        }
        if any {
            self.inner.signal.notify_one();
        }
    }

    /// Wakes the relay (it polls the outbox).
    pub fn notify(&self) {
        self.inner.signal.notify_one();
    }

    fn take(&self, max: usize) -> Vec<Committed> {
        match self.inner.queue.lock() {
            Ok(mut queue) => {
                let n = max.min(queue.len());
                queue.drain(..n).collect()
            }
            Err(_) => Vec::new(),
        }
    }

    /// Events handed over and not yet taken by the relay.
    pub fn waiting(&self) -> usize {
        self.inner.queue.lock().map(|q| q.len()).unwrap_or(0)
    }
}

/// Writes `envelope` to the outbox (call inside the state change's
/// transaction), unleased: any relay's poll picks it up. The current span's
/// trace context is stored with it, for the relay to send as the message's
/// `traceparent`.
pub async fn enqueue<C: ConnectionTrait>(
    conn: &C,
    envelope: &Envelope,
    routing_key: &str,
) -> Result<(), SagaError> {
    let event = NewEvent {
        envelope: envelope.clone(),
        routing_key: routing_key.to_owned(),
        trace: TraceContext::current(),
    };
    enqueue_many(conn, std::slice::from_ref(&event), None).await?;
    Ok(())
}

/// Writes `events` to the outbox in one statement (call inside the state
/// change's transaction), leased until `leased_until` to the writer's relay
/// (`None`: free for any relay). Returns what to hand to the relay after the
/// commit ([`OutboxHandle::committed`]).
pub async fn enqueue_many<C: ConnectionTrait>(
    conn: &C,
    events: &[NewEvent],
    leased_until: Option<DateTime<Utc>>,
) -> Result<Vec<Committed>, SagaError> {
    use saga_outbox::Column as O;
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let committed = committed_of(events)?;
    if conn.get_database_backend() == DbBackend::Postgres {
        let rows = pg_rows(events, &committed)?;
        conn.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            pg_insert(1, 2),
            [leased_until.into(), rows.into()],
        ))
        .await?;
        return Ok(committed);
    }
    let mut insert = Query::insert();
    insert.into_table(saga_outbox::Entity).columns([
        O::MessageId,
        O::MessageType,
        O::RoutingKey,
        O::CorrelationId,
        O::Body,
        O::CreatedAt,
        O::LockedUntil,
        O::SentAt,
        O::PublishAttempts,
        O::LastError,
        O::Traceparent,
        O::Tracestate,
    ]);
    for (event, c) in events.iter().zip(&committed) {
        let body: serde_json::Value = serde_json::from_slice(&c.body)
            .map_err(|e| SagaError::Corrupt(format!("envelope: {e}")))?;
        let (traceparent, tracestate) = TraceContext::columns(c.trace.as_ref());
        insert
            .values([
                c.message_id.into(),
                c.message_type.clone().into(),
                c.routing_key.clone().into(),
                c.correlation_id.clone().into(),
                body.into(),
                event.envelope.occurred_at.into(),
                leased_until.into(),
                Option::<DateTime<Utc>>::None.into(),
                0.into(),
                Option::<String>::None.into(),
                traceparent.into(),
                tracestate.into(),
            ])
            .map_err(|e| SagaError::Corrupt(e.to_string()))?;
    }
    conn.execute(&insert).await?;
    Ok(committed)
}

/// The events as the relay publishes them (each envelope serialized once).
pub(crate) fn committed_of(events: &[NewEvent]) -> Result<Vec<Committed>, SagaError> {
    let mut committed = Vec::with_capacity(events.len());
    for event in events {
        let envelope = &event.envelope;
        let body = serde_json::to_vec(envelope)
            .map_err(|e| SagaError::Corrupt(format!("envelope: {e}")))?;
        committed.push(Committed {
            message_id: envelope.message_id,
            message_type: envelope.message_type.clone(),
            correlation_id: envelope.correlation_id.clone(),
            routing_key: event.routing_key.clone(),
            body,
            trace: event.trace.clone(),
        });
    }
    Ok(committed)
}

/// The rows of `events` as one JSON array, for [`pg_insert`]: one
/// parameter, where a `VALUES` list takes twelve per row (cheaper to build
/// here and to plan there).
pub(crate) fn pg_rows(events: &[NewEvent], committed: &[Committed]) -> Result<String, SagaError> {
    let mut rows = Vec::with_capacity(committed.len());
    for (event, c) in events.iter().zip(committed) {
        let (traceparent, tracestate) = TraceContext::columns(c.trace.as_ref());
        let body = std::str::from_utf8(&c.body)
            .ok()
            .and_then(|b| RawValue::from_string(b.to_owned()).ok())
            .ok_or_else(|| SagaError::Corrupt("envelope: not JSON".into()))?;
        rows.push(PgOutboxRow {
            message_id: c.message_id,
            message_type: &c.message_type,
            routing_key: &c.routing_key,
            correlation_id: &c.correlation_id,
            body,
            created_at: micros(event.envelope.occurred_at),
            traceparent,
            tracestate,
        });
    }
    serde_json::to_string(&rows).map_err(|e| SagaError::Corrupt(format!("outbox rows: {e}")))
}

/// The PostgreSQL insert of [`pg_rows`]' rows (parameter `rows`), leased
/// until parameter `leased_until` (a timestamp or NULL).
pub(crate) fn pg_insert(leased_until: usize, rows: usize) -> String {
    format!(
        "INSERT INTO saga_outbox (message_id, message_type, routing_key, correlation_id, \
         body, created_at, locked_until, sent_at, publish_attempts, last_error, \
         traceparent, tracestate) \
         SELECT (r->>'message_id')::uuid, r->>'message_type', r->>'routing_key', \
         r->>'correlation_id', r->'body', (r->>'created_at')::timestamptz, \
         ${leased_until}::timestamptz, NULL, 0, NULL, r->>'traceparent', r->>'tracestate' \
         FROM jsonb_array_elements(${rows}::text::jsonb) WITH ORDINALITY AS t(r, n) ORDER BY n"
    )
}

/// An outbox row as [`pg_rows`] sends it to PostgreSQL.
#[derive(serde::Serialize)]
struct PgOutboxRow<'a> {
    message_id: Uuid,
    message_type: &'a str,
    routing_key: &'a str,
    correlation_id: &'a str,
    body: Box<RawValue>,
    created_at: String,
    traceparent: Option<String>,
    tracestate: Option<String>,
}

/// A timestamp as PostgreSQL stores it (microseconds, truncated as the
/// driver truncates a bound timestamp).
pub(crate) fn micros(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

#[derive(Clone, Debug)]
/// How the relay claims and publishes outbox rows (`outbox.*`).
pub struct RelaySettings {
    /// Rows claimed and published per round.
    pub batch_size: u64,
    /// How long a lease lasts (a writer's on its new events, a relay's on
    /// the rows it claimed) before another relay may take the rows over. The
    /// holder renews it while it waits for the broker.
    pub lease: Duration,
    /// How long to wait after a failed publish before trying the row again.
    pub retry_after: Duration,
    /// Poll interval when nobody signals new rows.
    pub poll_interval: StdDuration,
}

impl Default for RelaySettings {
    fn default() -> Self {
        Self {
            batch_size: 200,
            lease: Duration::seconds(5),
            retry_after: Duration::seconds(1),
            poll_interval: StdDuration::from_millis(500),
        }
    }
}

/// What one relay round did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RelayOutcome {
    /// Rows this round took: handed over by writers, or leased by a claim.
    pub claimed: usize,
    /// Of those, confirmed by the broker and marked sent.
    pub published: usize,
    /// Of those, to be retried later.
    pub failed: usize,
}

/// Publishes committed outbox rows with publisher confirms and marks them
/// sent: the events its process's writers hand over, and any row whose lease
/// is free. Several relays may run at once.
pub struct OutboxRelay {
    db: DatabaseConnection,
    transport: Arc<dyn Transport>,
    clock: Arc<dyn Clock>,
    settings: RelaySettings,
    handle: OutboxHandle,
}

impl OutboxRelay {
    /// A relay reading `db` and publishing on `transport`; `handle` is how
    /// the writers of this process hand it their committed events (and wake
    /// it).
    pub fn new(
        db: DatabaseConnection,
        transport: Arc<dyn Transport>,
        clock: Arc<dyn Clock>,
        settings: RelaySettings,
        handle: OutboxHandle,
    ) -> Self {
        Self {
            db,
            transport,
            clock,
            settings,
            handle,
        }
    }

    /// The handle writers use to reach this relay.
    pub fn handle(&self) -> &OutboxHandle {
        &self.handle
    }

    /// One round: publishes the events writers handed over if there are
    /// any, else claims, publishes and marks one batch of free rows.
    pub async fn try_relay_once(&self) -> Result<RelayOutcome, SagaError> {
        let batch = usize::try_from(self.settings.batch_size).unwrap_or(usize::MAX);
        let handed = self.handle.take(batch.max(1));
        if !handed.is_empty() {
            return self.publish(handed).await;
        }
        let now = self.clock.now();
        let rows = self.claim(now).await?;
        if rows.is_empty() {
            return Ok(RelayOutcome::default());
        }
        let mut events = Vec::with_capacity(rows.len());
        for row in rows {
            events.push(Committed {
                message_id: row.message_id,
                message_type: row.message_type,
                correlation_id: row.correlation_id,
                routing_key: row.routing_key,
                body: serde_json::to_vec(&row.body)
                    .map_err(|e| SagaError::Corrupt(format!("outbox row {}: {e}", row.id)))?,
                trace: TraceContext::from_columns(
                    row.traceparent.as_deref(),
                    row.tracestate.as_deref(),
                ),
            });
        }
        self.publish(events).await
    }

    /// Publishes leased events (renewing their lease while the broker
    /// answers) and marks them sent or failed.
    async fn publish(&self, events: Vec<Committed>) -> Result<RelayOutcome, SagaError> {
        let mut messages = Vec::with_capacity(events.len());
        // One span per message, continuing the trace of the transaction that
        // wrote it; the message carries the span's context to its consumers.
        let mut spans = Vec::with_capacity(events.len());
        for event in &events {
            let span = tracing::info_span!(
                "outbox.publish",
                correlation_id = %event.correlation_id,
                message_id = %event.message_id,
                message_type = %event.message_type,
                trace_id = tracing::field::Empty,
                otel.kind = "producer",
            );
            trace::continue_trace(&span, event.trace.as_ref());
            messages.push(OutgoingMessage {
                message_id: event.message_id,
                message_type: event.message_type.clone(),
                correlation_id: event.correlation_id.clone(),
                routing_key: event.routing_key.clone(),
                body: event.body.clone(),
                // Without an OpenTelemetry layer, pass the stored context on.
                trace: TraceContext::of(&span).or_else(|| event.trace.clone()),
            });
            spans.push(span);
        }
        let ids: Vec<Uuid> = events.iter().map(|e| e.message_id).collect();
        let results = self.publish_renewing(&messages, &ids).await;
        let results = match results {
            Ok(results) => results,
            Err(e) => {
                self.mark_failed(&ids, &e.to_string()).await?;
                crate::metrics::outbox_relayed(0, ids.len());
                tracing::warn!(error = %e, count = ids.len(), "outbox relay could not publish");
                return Ok(RelayOutcome {
                    claimed: events.len(),
                    published: 0,
                    failed: events.len(),
                });
            }
        };
        let mut sent = Vec::new();
        let mut failed = Vec::new();
        for ((event, result), span) in events.iter().zip(results).zip(&spans) {
            let _entered = span.enter();
            match result {
                Ok(()) => {
                    tracing::debug!("published");
                    sent.push(event.message_id)
                }
                Err(e) => {
                    tracing::warn!(
                        message_id = %event.message_id,
                        correlation_id = %event.correlation_id,
                        error = %e,
                        "broker did not accept an outbox message; will retry"
                    );
                    failed.push(event.message_id)
                }
            }
        }
        if !sent.is_empty() {
            saga_outbox::Entity::update_many()
                .col_expr(saga_outbox::Column::SentAt, Expr::value(self.clock.now()))
                .col_expr(
                    saga_outbox::Column::LockedUntil,
                    Expr::value(Option::<DateTime<Utc>>::None),
                )
                .col_expr(
                    saga_outbox::Column::PublishAttempts,
                    Expr::col(saga_outbox::Column::PublishAttempts).add(1),
                )
                .filter(saga_outbox::Column::MessageId.is_in(sent.clone()))
                .exec(&self.db)
                .await?;
        }
        if !failed.is_empty() {
            self.mark_failed(&failed, "broker did not confirm").await?;
        }
        crate::metrics::outbox_relayed(sent.len(), failed.len());
        Ok(RelayOutcome {
            claimed: events.len(),
            published: sent.len(),
            failed: failed.len(),
        })
    }

    /// Publishes `messages`, renewing the lease on `ids` every third of a
    /// lease while the broker has not answered.
    async fn publish_renewing(
        &self,
        messages: &[OutgoingMessage],
        ids: &[Uuid],
    ) -> Result<Vec<Result<(), crate::error::TransportError>>, crate::error::TransportError> {
        let every = (self.settings.lease / 3)
            .to_std()
            .unwrap_or(StdDuration::from_secs(1))
            .max(StdDuration::from_millis(100));
        let publish = self.transport.publish(messages);
        tokio::pin!(publish);
        let mut renew = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tokio::select! {
                results = &mut publish => return results,
                _ = renew.tick() => {
                    if let Err(e) = self.renew(ids).await {
                        tracing::warn!(error = %e, "could not renew outbox leases");
                    }
                }
            }
        }
    }

    async fn renew(&self, ids: &[Uuid]) -> Result<(), SagaError> {
        saga_outbox::Entity::update_many()
            .col_expr(
                saga_outbox::Column::LockedUntil,
                Expr::value(self.clock.now() + self.settings.lease),
            )
            .filter(saga_outbox::Column::MessageId.is_in(ids.to_vec()))
            .filter(saga_outbox::Column::SentAt.is_null())
            .exec(&self.db)
            .await?;
        Ok(())
    }

    async fn claim(&self, now: DateTime<Utc>) -> Result<Vec<saga_outbox::Model>, SagaError> {
        let txn = self.db.begin().await?;
        let rows = saga_outbox::Entity::find()
            .filter(saga_outbox::Column::SentAt.is_null())
            .filter(
                Condition::any()
                    .add(saga_outbox::Column::LockedUntil.is_null())
                    .add(saga_outbox::Column::LockedUntil.lte(now)),
            )
            .order_by_asc(saga_outbox::Column::Id)
            .limit(self.settings.batch_size)
            .lock_with_behavior(LockType::Update, LockBehavior::SkipLocked)
            .all(&txn)
            .await?;
        if !rows.is_empty() {
            saga_outbox::Entity::update_many()
                .col_expr(
                    saga_outbox::Column::LockedUntil,
                    Expr::value(now + self.settings.lease),
                )
                .filter(saga_outbox::Column::Id.is_in(rows.iter().map(|r| r.id)))
                .exec(&txn)
                .await?;
        }
        txn.commit().await?;
        Ok(rows)
    }

    async fn mark_failed(&self, ids: &[Uuid], error: &str) -> Result<(), SagaError> {
        saga_outbox::Entity::update_many()
            .col_expr(
                saga_outbox::Column::LockedUntil,
                Expr::value(self.clock.now() + self.settings.retry_after),
            )
            .col_expr(
                saga_outbox::Column::PublishAttempts,
                Expr::col(saga_outbox::Column::PublishAttempts).add(1),
            )
            .col_expr(saga_outbox::Column::LastError, Expr::value(error))
            .filter(saga_outbox::Column::MessageId.is_in(ids.to_vec()))
            .exec(&self.db)
            .await?;
        Ok(())
    }

    /// Frees every lease at once (unsent rows become claimable now). Only
    /// for a process that knows no other relay runs, such as the embedded
    /// host at start: the leases of its previous life (a `kill -9`) are
    /// then released instead of waited out.
    pub async fn release_leases(&self) -> Result<u64, SagaError> {
        let released = saga_outbox::Entity::update_many()
            .col_expr(
                saga_outbox::Column::LockedUntil,
                Expr::value(Option::<DateTime<Utc>>::None),
            )
            .filter(saga_outbox::Column::SentAt.is_null())
            .filter(saga_outbox::Column::LockedUntil.is_not_null())
            .exec(&self.db)
            .await?;
        Ok(released.rows_affected)
    }

    /// Relays until `shutdown` is cancelled: immediately while there is work
    /// (events handed over, or free rows), otherwise on a writer's signal or
    /// every `poll_interval`.
    pub async fn run_until_stopped(&self, shutdown: CancellationToken) {
        let mut failures: u32 = 0;
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let wait = match self.try_relay_once().await {
                Ok(outcome) if outcome.claimed > 0 && outcome.failed == 0 => {
                    failures = 0;
                    continue;
                }
                Ok(outcome) if outcome.failed > 0 => {
                    failures = failures.saturating_add(1);
                    backoff(failures, self.settings.poll_interval)
                }
                Ok(_) => {
                    failures = 0;
                    self.settings.poll_interval
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    tracing::error!(error = %e, "outbox relay round failed");
                    backoff(failures, self.settings.poll_interval)
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.handle.inner.signal.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Number of unsent outbox rows.
    pub async fn backlog(&self) -> Result<u64, SagaError> {
        Ok(saga_outbox::Entity::find()
            .filter(saga_outbox::Column::SentAt.is_null())
            .count(&self.db)
            .await?)
    }
}

fn backoff(failures: u32, base: StdDuration) -> StdDuration {
    let factor = 2u32.saturating_pow(Ord::min(failures, 6));
    (base * factor).min(StdDuration::from_secs(30))
}
