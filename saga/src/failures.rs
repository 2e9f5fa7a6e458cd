//! The persisted retry budget of a message at a consumer that has no saga
//! instance to keep it on (a notifications consumer, a failing start): one row per
//! `(consumer, message_id)`, counted in the database so every runner and
//! every restart share it.

use crate::schema::message_failures as failures;
use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict, Query};
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter};

use crate::error::SagaError;
use crate::message::Envelope;
use crate::retry::Attempts;

/// Counts one failed attempt of `envelope` at `consumer`. Non-retryable
/// errors spend the whole budget at once.
pub async fn record<C: ConnectionTrait>(
    conn: &C,
    consumer: &str,
    envelope: &Envelope,
    error: &SagaError,
    budget: u32,
    now: DateTime<Utc>,
) -> Result<Attempts, SagaError> {
    use failures::Column as F;
    let text = error.to_string();
    let mut upsert = Query::insert();
    upsert
        .into_table(failures::Entity)
        .columns([
            F::Consumer,
            F::MessageId,
            F::CorrelationId,
            F::Attempts,
            F::LastError,
            F::FirstFailedAt,
            F::LastFailedAt,
        ])
        .values([
            consumer.into(),
            envelope.message_id.into(),
            envelope.correlation_id.clone().into(),
            1.into(),
            text.clone().into(),
            now.into(),
            now.into(),
        ])
        .map_err(|e| SagaError::Corrupt(e.to_string()))?
        .on_conflict(
            OnConflict::columns([F::Consumer, F::MessageId])
                .value(
                    F::Attempts,
                    Expr::col((failures::Entity, F::Attempts)).add(1),
                )
                .value(F::LastError, Expr::value(text))
                .value(F::LastFailedAt, Expr::value(now))
                .to_owned(),
        );
    conn.execute(&upsert).await?;
    let row = failures::Entity::find_by_id((consumer.to_owned(), envelope.message_id))
        .one(conn)
        .await?
        .ok_or_else(|| SagaError::Corrupt("failure row vanished".to_owned()))?;
    let budget = if error.is_retryable() {
        i32::try_from(Ord::max(budget, 1)).unwrap_or(i32::MAX)
    } else {
        1
    };
    Ok(Attempts {
        spent: row.attempts,
        exhausted: row.attempts >= budget,
    })
}

/// Forgets the failed attempts of `message_ids` at `consumer`: re-driven
/// messages start with a fresh budget. Returns how many records went.
pub async fn forget<C: ConnectionTrait>(
    conn: &C,
    consumer: &str,
    message_ids: &[uuid::Uuid],
) -> Result<u64, SagaError> {
    if message_ids.is_empty() {
        return Ok(0);
    }
    let deleted = failures::Entity::delete_many()
        .filter(failures::Column::Consumer.eq(consumer))
        .filter(failures::Column::MessageId.is_in(message_ids.iter().copied()))
        .exec(conn)
        .await?;
    Ok(deleted.rows_affected)
}
