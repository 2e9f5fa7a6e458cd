//! The transactional outbox and its relay.
//!
//! Events are written to `saga_outbox` in the same transaction as the state
//! change that caused them. A relay claims unsent rows (a short lease taken
//! with `FOR UPDATE SKIP LOCKED`, so several relays can run), publishes them
//! with publisher confirms, and marks them sent. No database transaction is
//! held while waiting for the broker. A relay that dies after publishing but
//! before marking leaves the lease to expire: the row is published again and
//! the consumers' inbox drops the duplicate (at-least-once + idempotency).

use std::sync::Arc;
use std::time::Duration as StdDuration;

use crate::schema::outbox as saga_outbox;
use chrono::{DateTime, Duration, Utc};
use sea_orm::sea_query::{Expr, ExprTrait as _, LockBehavior, LockType};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, Condition, ConnectionTrait, DatabaseConnection, EntityTrait,
    PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, TransactionTrait,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::error::SagaError;
use crate::message::Envelope;
use crate::trace::{self, TraceContext};
use crate::transport::{OutgoingMessage, Transport};

/// Writes `envelope` to the outbox (call inside the state change's
/// transaction). The current span's trace context is stored with it, for the
/// relay to send as the message's `traceparent`.
pub async fn enqueue<C: ConnectionTrait>(
    conn: &C,
    envelope: &Envelope,
    routing_key: &str,
) -> Result<(), SagaError> {
    let body =
        serde_json::to_value(envelope).map_err(|e| SagaError::Corrupt(format!("envelope: {e}")))?;
    let (traceparent, tracestate) = TraceContext::columns(TraceContext::current().as_ref());
    saga_outbox::Entity::insert(saga_outbox::ActiveModel {
        message_id: Set(envelope.message_id),
        message_type: Set(envelope.message_type.clone()),
        routing_key: Set(routing_key.to_owned()),
        correlation_id: Set(envelope.correlation_id.clone()),
        body: Set(body),
        created_at: Set(envelope.occurred_at),
        locked_until: Set(None),
        sent_at: Set(None),
        publish_attempts: Set(0),
        last_error: Set(None),
        traceparent: Set(traceparent),
        tracestate: Set(tracestate),
        ..Default::default()
    })
    .exec(conn)
    .await?;
    Ok(())
}

#[derive(Clone, Debug)]
/// How the relay claims and publishes outbox rows (`outbox.*`).
pub struct RelaySettings {
    /// Rows claimed and published per round.
    pub batch_size: u64,
    /// How long a claim lasts before another relay may take the rows over.
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
            lease: Duration::seconds(30),
            retry_after: Duration::seconds(1),
            poll_interval: StdDuration::from_millis(500),
        }
    }
}

/// What one relay round did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RelayOutcome {
    /// Rows leased by this round.
    pub claimed: usize,
    /// Of those, confirmed by the broker and marked sent.
    pub published: usize,
    /// Of those, to be retried later.
    pub failed: usize,
}

/// Publishes committed outbox rows with publisher confirms and marks them sent. Several relays may run at once (rows are leased with `SKIP LOCKED`).
pub struct OutboxRelay {
    db: DatabaseConnection,
    transport: Arc<dyn Transport>,
    clock: Arc<dyn Clock>,
    settings: RelaySettings,
    signal: Arc<Notify>,
}

impl OutboxRelay {
    /// A relay reading `db` and publishing on `transport`; `signal` wakes it when a transaction queued events.
    pub fn new(
        db: DatabaseConnection,
        transport: Arc<dyn Transport>,
        clock: Arc<dyn Clock>,
        settings: RelaySettings,
        signal: Arc<Notify>,
    ) -> Self {
        Self {
            db,
            transport,
            clock,
            settings,
            signal,
        }
    }

    /// Claims, publishes and marks one batch.
    pub async fn try_relay_once(&self) -> Result<RelayOutcome, SagaError> {
        let now = self.clock.now();
        let rows = self.claim(now).await?;
        if rows.is_empty() {
            return Ok(RelayOutcome::default());
        }
        let mut messages = Vec::with_capacity(rows.len());
        // One span per message, continuing the trace of the transaction that
        // wrote it; the message carries the span's context to its consumers.
        let mut spans = Vec::with_capacity(rows.len());
        for row in &rows {
            let stored =
                TraceContext::from_columns(row.traceparent.as_deref(), row.tracestate.as_deref());
            let span = tracing::info_span!(
                "outbox.publish",
                correlation_id = %row.correlation_id,
                message_id = %row.message_id,
                message_type = %row.message_type,
                trace_id = tracing::field::Empty,
                otel.kind = "producer",
            );
            trace::continue_trace(&span, stored.as_ref());
            messages.push(OutgoingMessage {
                message_id: row.message_id,
                message_type: row.message_type.clone(),
                correlation_id: row.correlation_id.clone(),
                routing_key: row.routing_key.clone(),
                body: serde_json::to_vec(&row.body)
                    .map_err(|e| SagaError::Corrupt(format!("outbox row {}: {e}", row.id)))?,
                // Without an OpenTelemetry layer, pass the stored context on.
                trace: TraceContext::of(&span).or(stored),
            });
            spans.push(span);
        }
        let results = match self.transport.publish(&messages).await {
            Ok(results) => results,
            Err(e) => {
                let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
                self.mark_failed(&ids, &e.to_string()).await?;
                crate::metrics::outbox_relayed(0, ids.len());
                tracing::warn!(error = %e, count = ids.len(), "outbox relay could not publish");
                return Ok(RelayOutcome {
                    claimed: rows.len(),
                    published: 0,
                    failed: rows.len(),
                });
            }
        };
        let mut sent = Vec::new();
        let mut failed = Vec::new();
        for ((row, result), span) in rows.iter().zip(results).zip(&spans) {
            let _entered = span.enter();
            match result {
                Ok(()) => {
                    tracing::debug!("published");
                    sent.push(row.id)
                }
                Err(e) => {
                    tracing::warn!(
                        message_id = %row.message_id,
                        correlation_id = %row.correlation_id,
                        error = %e,
                        "broker did not accept an outbox message; will retry"
                    );
                    failed.push(row.id)
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
                .filter(saga_outbox::Column::Id.is_in(sent.clone()))
                .exec(&self.db)
                .await?;
        }
        if !failed.is_empty() {
            self.mark_failed(&failed, "broker did not confirm").await?;
        }
        crate::metrics::outbox_relayed(sent.len(), failed.len());
        Ok(RelayOutcome {
            claimed: rows.len(),
            published: sent.len(),
            failed: failed.len(),
        })
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

    async fn mark_failed(&self, ids: &[i64], error: &str) -> Result<(), SagaError> {
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
            .filter(saga_outbox::Column::Id.is_in(ids.to_vec()))
            .exec(&self.db)
            .await?;
        Ok(())
    }

    /// Relays until `shutdown` is cancelled: immediately while there is work,
    /// otherwise on a signal or every `poll_interval`.
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
                _ = self.signal.notified() => {}
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
