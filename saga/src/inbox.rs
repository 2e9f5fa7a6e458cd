//! The inbox: `(consumer, message_id)` rows written in the same transaction as
//! a handler's effects, so a redelivered or duplicated message is skipped.

use crate::schema::inbox as saga_inbox;
use chrono::{DateTime, Utc};
use sea_orm::ConnectionTrait;
use sea_orm::sea_query::{OnConflict, Query};

use crate::error::SagaError;
use crate::message::Envelope;

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
