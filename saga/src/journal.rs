//! The journal (`saga_transitions`): one row per input an instance was
//! given (applied, ignored, failed, parked) and per operator action, with the
//! input as JSON. It makes any outcome explainable after the fact.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use sea_orm::{ActiveValue::Set, ConnectionTrait, DbBackend, EntityTrait, Statement};
use uuid::Uuid;

use crate::error::SagaError;
use crate::schema::transitions;

/// What became of one journalled input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JournalOutcome {
    /// The instance moved (possibly to the same state) and its effects ran.
    Applied,
    /// The table ignored the input (a duplicate or a late arrival).
    Ignored,
    /// Handling it failed; the attempt was counted and will be retried.
    Failed,
    /// Handling it failed and the retry budget is spent: the instance is parked.
    Parked,
    /// An operator resumed the parked instance.
    Resumed,
}

impl JournalOutcome {
    /// Every outcome.
    pub const ALL: [JournalOutcome; 5] = [
        JournalOutcome::Applied,
        JournalOutcome::Ignored,
        JournalOutcome::Failed,
        JournalOutcome::Parked,
        JournalOutcome::Resumed,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            JournalOutcome::Applied => "applied",
            JournalOutcome::Ignored => "ignored",
            JournalOutcome::Failed => "failed",
            JournalOutcome::Parked => "parked",
            JournalOutcome::Resumed => "resumed",
        }
    }
}

impl fmt::Display for JournalOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JournalOutcome {
    type Err = SagaError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JournalOutcome::ALL
            .into_iter()
            .find(|o| o.as_str() == s)
            .ok_or_else(|| SagaError::Corrupt(format!("unknown journal outcome `{s}`")))
    }
}

/// One journal row to write.
#[derive(Clone, Debug)]
pub struct Entry<'a> {
    /// The saga type.
    pub saga_type: &'a str,
    /// `saga_instances.id`.
    pub instance_id: i64,
    /// The instance's correlation id.
    pub correlation_id: &'a str,
    /// The state before (`None` for the row that started the instance).
    pub from: Option<&'a str>,
    /// The state after.
    pub to: &'a str,
    /// The input's name, or the operator action.
    pub trigger: &'a str,
    /// What became of it.
    pub outcome: JournalOutcome,
    /// The consumed message, if the input came from one.
    pub message_id: Option<Uuid>,
    /// The attempt in the retry budget.
    pub attempt: i32,
    /// The input as JSON.
    pub input: Option<serde_json::Value>,
    /// The table's note, and where the input came from.
    pub detail: Option<String>,
    /// The error of a failed attempt.
    pub error: Option<String>,
}

/// Writes one journal row (call inside the transaction that did the work).
pub async fn write<C: ConnectionTrait>(
    conn: &C,
    entry: Entry<'_>,
    now: DateTime<Utc>,
) -> Result<(), SagaError> {
    transitions::Entity::insert(transitions::ActiveModel {
        saga_instance_id: Set(entry.instance_id),
        saga_type: Set(entry.saga_type.to_owned()),
        correlation_id: Set(entry.correlation_id.to_owned()),
        from_state: Set(entry.from.map(str::to_owned)),
        to_state: Set(entry.to.to_owned()),
        trigger: Set(entry.trigger.to_owned()),
        outcome: Set(entry.outcome.as_str().to_owned()),
        message_id: Set(entry.message_id),
        attempt: Set(entry.attempt),
        input: Set(entry.input),
        detail: Set(entry.detail),
        error: Set(entry.error),
        occurred_at: Set(now),
        ..Default::default()
    })
    .exec(conn)
    .await?;
    Ok(())
}

/// A journal row owned by a batch (written with [`write_many`]).
#[derive(Clone, Debug)]
pub struct Row {
    /// `saga_instances.id`.
    pub instance_id: i64,
    /// The instance's correlation id.
    pub correlation_id: String,
    /// The state before (`None` for the row that started the instance).
    pub from: Option<&'static str>,
    /// The state after.
    pub to: &'static str,
    /// The input's name, or the operator action.
    pub trigger: String,
    /// What became of it.
    pub outcome: JournalOutcome,
    /// The consumed message, if the input came from one.
    pub message_id: Option<Uuid>,
    /// The attempt in the retry budget.
    pub attempt: i32,
    /// The input as JSON.
    pub input: Option<serde_json::Value>,
    /// The table's note, and where the input came from.
    pub detail: Option<String>,
}

/// `rows` as one JSON array, for [`pg_insert`]: one parameter instead of
/// thirteen per row.
pub(crate) fn pg_rows(rows: &[Row]) -> Result<String, SagaError> {
    let json: Vec<PgJournalRow<'_>> = rows
        .iter()
        .map(|row| PgJournalRow {
            instance_id: row.instance_id,
            correlation_id: &row.correlation_id,
            from: row.from,
            to: row.to,
            trigger: &row.trigger,
            outcome: row.outcome.as_str(),
            message_id: row.message_id,
            attempt: row.attempt,
            input: row.input.as_ref(),
            detail: row.detail.as_deref(),
        })
        .collect();
    serde_json::to_string(&json).map_err(|e| SagaError::Corrupt(format!("journal rows: {e}")))
}

/// The PostgreSQL insert of [`pg_rows`]' rows (parameter `rows`) for saga
/// type parameter `saga_type` at parameter `now`. `r->'input'` is SQL NULL
/// only when the key is absent (no input); an input that is JSON `null`
/// stays JSON `null`.
pub(crate) fn pg_insert(saga_type: usize, now: usize, rows: usize) -> String {
    pg_insert_for("(r->>'instance_id')::bigint", saga_type, now, rows)
}

/// [`pg_insert`] with the instance id given by the SQL expression
/// `instance_id` (a start's rows, written with the instance they start).
pub(crate) fn pg_insert_for(
    instance_id: &str,
    saga_type: usize,
    now: usize,
    rows: usize,
) -> String {
    format!(
        "INSERT INTO saga_transitions (saga_instance_id, saga_type, correlation_id, \
         from_state, to_state, trigger, outcome, message_id, attempt, input, detail, error, \
         occurred_at) \
         SELECT {instance_id}, ${saga_type}::varchar, r->>'correlation_id', \
         r->>'from', r->>'to', r->>'trigger', r->>'outcome', (r->>'message_id')::uuid, \
         (r->>'attempt')::int, r->'input', r->>'detail', NULL, ${now}::timestamptz \
         FROM jsonb_array_elements(${rows}::text::jsonb) WITH ORDINALITY AS t(r, n) ORDER BY n"
    )
}

/// A journal row as [`pg_rows`] sends it to PostgreSQL.
#[derive(serde::Serialize)]
struct PgJournalRow<'a> {
    instance_id: i64,
    correlation_id: &'a str,
    from: Option<&'a str>,
    to: &'a str,
    trigger: &'a str,
    outcome: &'a str,
    message_id: Option<Uuid>,
    attempt: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    input: Option<&'a serde_json::Value>,
    detail: Option<&'a str>,
}

/// Writes the rows of a batch in one statement.
pub async fn write_many<C: ConnectionTrait>(
    conn: &C,
    saga_type: &str,
    rows: &[Row],
    now: DateTime<Utc>,
) -> Result<(), SagaError> {
    if rows.is_empty() {
        return Ok(());
    }
    if conn.get_database_backend() == DbBackend::Postgres {
        conn.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            pg_insert(1, 2, 3),
            [saga_type.into(), now.into(), pg_rows(rows)?.into()],
        ))
        .await?;
        return Ok(());
    }
    transitions::Entity::insert_many(rows.iter().map(|row| transitions::ActiveModel {
        saga_instance_id: Set(row.instance_id),
        saga_type: Set(saga_type.to_owned()),
        correlation_id: Set(row.correlation_id.clone()),
        from_state: Set(row.from.map(str::to_owned)),
        to_state: Set(row.to.to_owned()),
        trigger: Set(row.trigger.clone()),
        outcome: Set(row.outcome.as_str().to_owned()),
        message_id: Set(row.message_id),
        attempt: Set(row.attempt),
        input: Set(row.input.clone()),
        detail: Set(row.detail.clone()),
        error: Set(None),
        occurred_at: Set(now),
        ..Default::default()
    }))
    .exec(conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_round_trip_through_their_names() {
        for outcome in JournalOutcome::ALL {
            assert_eq!(
                outcome.as_str().parse::<JournalOutcome>().ok(),
                Some(outcome)
            );
        }
        assert!("exploded".parse::<JournalOutcome>().is_err());
    }
}
