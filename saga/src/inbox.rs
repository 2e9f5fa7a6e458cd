//! The inbox: `(consumer, message_id)` rows written in the same transaction as
//! a handler's effects, so a redelivered or duplicated message is skipped.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use sea_orm::ConnectionTrait;
use sea_orm::sea_query::{OnConflict, Query};
use uuid::Uuid;

use crate::error::SagaError;
use crate::message::Envelope;
use crate::schema::inbox as saga_inbox;

/// Records that `consumer` handles `envelope`. `false` means it already did
/// (or a concurrent transaction is doing it right now and committed first).
pub async fn record<C: ConnectionTrait>(
    conn: &C,
    consumer: &str,
    envelope: &Envelope,
    now: DateTime<Utc>,
) -> Result<bool, SagaError> {
    use saga_inbox::Column as I;
    let mut insert = Query::insert();
    insert
        .into_table(saga_inbox::Entity)
        .columns([I::Consumer, I::MessageId, I::MessageType, I::ProcessedAt])
        .values([
            consumer.into(),
            envelope.message_id.into(),
            envelope.message_type.clone().into(),
            now.into(),
        ])
        .map_err(|e| SagaError::Corrupt(e.to_string()))?
        .on_conflict(
            OnConflict::columns([I::Consumer, I::MessageId])
                .do_nothing()
                .to_owned(),
        );
    Ok(conn.execute(&insert).await?.rows_affected() == 1)
}

/// Records that `consumer` handles every envelope of a batch, in one
/// statement. Returns the message ids that were new: the others were handled
/// already (or are being handled by a concurrent transaction that committed
/// first). A message id twice in the batch is new at most once.
pub async fn record_many<C: ConnectionTrait>(
    conn: &C,
    consumer: &str,
    envelopes: &[&Envelope],
    now: DateTime<Utc>,
) -> Result<HashSet<Uuid>, SagaError> {
    use saga_inbox::Column as I;
    if envelopes.is_empty() {
        return Ok(HashSet::new());
    }
    let mut insert = Query::insert();
    insert.into_table(saga_inbox::Entity).columns([
        I::Consumer,
        I::MessageId,
        I::MessageType,
        I::ProcessedAt,
    ]);
    let mut seen = HashSet::new();
    for envelope in envelopes {
        if !seen.insert(envelope.message_id) {
            continue;
        }
        insert
            .values([
                consumer.into(),
                envelope.message_id.into(),
                envelope.message_type.clone().into(),
                now.into(),
            ])
            .map_err(|e| SagaError::Corrupt(e.to_string()))?;
    }
    insert
        .on_conflict(
            OnConflict::columns([I::Consumer, I::MessageId])
                .do_nothing()
                .to_owned(),
        )
        .returning_col(I::MessageId);
    let rows = conn.query_all(&insert).await?;
    let mut fresh = HashSet::with_capacity(rows.len());
    for row in rows {
        fresh.insert(row.try_get::<Uuid>("", "message_id")?);
    }
    Ok(fresh)
}
