//! Read-only queries over the saga tables for operator tools (the hosts'
//! console, scripts): instances filtered by type, state, parked flag and
//! correlation id, paged; one instance with its journal, pending timers and
//! outbox events; and how many instances reached a final state per minute.
//! They run on PostgreSQL and SQLite, like the schema.

use chrono::{DateTime, NaiveDateTime, Utc};
use sea_orm::sea_query::{Expr, ExprTrait as _, Query};
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, DbBackend, EntityTrait, PaginatorTrait, QueryFilter,
    QueryOrder, QuerySelect,
};
use serde::Serialize;

use crate::error::SagaError;
use crate::journal::JournalOutcome;
use crate::schema::{instances, outbox, timers, transitions};

/// Which instances to list; `None` fields do not filter.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InstanceFilter {
    /// Only this saga type.
    pub saga_type: Option<String>,
    /// Only instances in this state.
    pub state: Option<String>,
    /// Only parked (`true`) or only running (`false`) instances.
    pub parked: Option<bool>,
    /// Only the instance(s) with this correlation id (exact).
    pub correlation_id: Option<String>,
}

/// An instance in a list (its data left out).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct InstanceSummary {
    /// Its saga type.
    pub saga_type: String,
    /// Its correlation id.
    pub correlation_id: String,
    /// Its state.
    pub state: String,
    /// Optimistic-concurrency version (how many changes it has had).
    pub version: i32,
    /// Failed attempts in the current retry budget.
    pub attempts: i32,
    /// Parked (faulted): waits for an operator.
    pub parked: bool,
    /// The error of the last failed attempt.
    pub last_error: Option<String>,
    /// When it entered its state.
    pub state_entered_at: DateTime<Utc>,
    /// When it began.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
}

impl From<instances::Model> for InstanceSummary {
    fn from(row: instances::Model) -> Self {
        Self {
            saga_type: row.saga_type,
            correlation_id: row.correlation_id,
            state: row.state,
            version: row.version,
            attempts: row.attempts,
            parked: row.faulted,
            last_error: row.last_error,
            state_entered_at: row.state_entered_at,
            created_at: row.created_at,
            updated_at: row.updated_at,
        }
    }
}

/// The instances `filter` selects, newest first (by id), `limit` from
/// `offset`, and how many it selects in all.
pub async fn instances<C: ConnectionTrait>(
    db: &C,
    filter: &InstanceFilter,
    limit: u64,
    offset: u64,
) -> Result<(Vec<InstanceSummary>, u64), SagaError> {
    use instances::Column as I;
    let mut query = instances::Entity::find();
    if let Some(saga_type) = &filter.saga_type {
        query = query.filter(I::SagaType.eq(saga_type.as_str()));
    }
    if let Some(state) = &filter.state {
        query = query.filter(I::State.eq(state.as_str()));
    }
    if let Some(parked) = filter.parked {
        query = query.filter(I::Faulted.eq(parked));
    }
    if let Some(correlation_id) = &filter.correlation_id {
        query = query.filter(I::CorrelationId.eq(correlation_id.as_str()));
    }
    let total = query.clone().count(db).await?;
    let rows = query
        .order_by_desc(I::Id)
        .limit(limit)
        .offset(offset)
        .all(db)
        .await?;
    Ok((rows.into_iter().map(InstanceSummary::from).collect(), total))
}

/// The instance `correlation_id` of `saga_type`, with its data.
pub async fn instance<C: ConnectionTrait>(
    db: &C,
    saga_type: &str,
    correlation_id: &str,
) -> Result<Option<instances::Model>, SagaError> {
    Ok(instances::Entity::find()
        .filter(instances::Column::SagaType.eq(saga_type))
        .filter(instances::Column::CorrelationId.eq(correlation_id))
        .one(db)
        .await?)
}

/// The instance's journal, oldest first: its first `limit` rows.
pub async fn journal<C: ConnectionTrait>(
    db: &C,
    instance_id: i64,
    limit: u64,
) -> Result<Vec<transitions::Model>, SagaError> {
    Ok(transitions::Entity::find()
        .filter(transitions::Column::SagaInstanceId.eq(instance_id))
        .order_by_asc(transitions::Column::Id)
        .limit(limit)
        .all(db)
        .await?)
}

/// The instance's timers that have not fired, soonest first.
pub async fn pending_timers<C: ConnectionTrait>(
    db: &C,
    instance_id: i64,
) -> Result<Vec<timers::Model>, SagaError> {
    Ok(timers::Entity::find()
        .filter(timers::Column::SagaInstanceId.eq(instance_id))
        .filter(timers::Column::FiredAt.is_null())
        .order_by_asc(timers::Column::DueAt)
        .all(db)
        .await?)
}

/// Outbox events with `correlation_id` (sent or not), oldest first: the
/// first `limit`. The outbox has no saga type: two saga types sharing a
/// correlation id show each other's events here.
pub async fn outbox_events<C: ConnectionTrait>(
    db: &C,
    correlation_id: &str,
    limit: u64,
) -> Result<Vec<outbox::Model>, SagaError> {
    Ok(outbox::Entity::find()
        .filter(outbox::Column::CorrelationId.eq(correlation_id))
        .order_by_asc(outbox::Column::Id)
        .limit(limit)
        .all(db)
        .await?)
}

/// How many instances of `saga_type` entered one of `final_states` in each
/// minute since `since`, from the journal (applied transitions into a final
/// state from a state that is not final). Minutes without any are left
/// out; each minute is its start, in UTC.
pub async fn decided_per_minute<C: ConnectionTrait>(
    db: &C,
    saga_type: &str,
    final_states: &[&str],
    since: DateTime<Utc>,
) -> Result<Vec<(DateTime<Utc>, u64)>, SagaError> {
    use instances::Column as I;
    use transitions::Column as T;
    if final_states.is_empty() {
        return Ok(Vec::new());
    }
    let minute = match db.get_database_backend() {
        DbBackend::Postgres => {
            r#"to_char(date_trunc('minute', "saga_transitions"."occurred_at" AT TIME ZONE 'UTC'), 'YYYY-MM-DD"T"HH24:MI')"#
        }
        DbBackend::Sqlite => r#"strftime('%Y-%m-%dT%H:%M', "saga_transitions"."occurred_at")"#,
        other => {
            return Err(SagaError::Corrupt(format!(
                "the saga tables support PostgreSQL and SQLite, not {other:?}"
            )));
        }
    };
    let finals: Vec<String> = final_states.iter().map(|s| (*s).to_owned()).collect();
    // Instances decided since `since` entered their final state then (a
    // final state is never left): the instance index narrows the journal
    // rows to read to theirs.
    let decided = Query::select()
        .column(I::Id)
        .from(instances::Entity)
        .and_where(Expr::col(I::SagaType).eq(saga_type))
        .and_where(Expr::col(I::State).is_in(finals.clone()))
        .and_where(Expr::col(I::StateEnteredAt).gte(since))
        .to_owned();
    let rows: Vec<(String, i64)> = transitions::Entity::find()
        .select_only()
        .column_as(Expr::cust(minute), "minute")
        .column_as(T::Id.count(), "n")
        .filter(T::SagaInstanceId.in_subquery(decided))
        .filter(T::SagaType.eq(saga_type))
        .filter(T::Outcome.eq(JournalOutcome::Applied.as_str()))
        .filter(T::ToState.is_in(finals.clone()))
        .filter(
            Condition::any()
                .add(T::FromState.is_null())
                .add(T::FromState.is_not_in(finals)),
        )
        .filter(T::OccurredAt.gte(since))
        .group_by(Expr::cust(minute))
        .into_tuple()
        .all(db)
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for (minute, n) in rows {
        let start = NaiveDateTime::parse_from_str(&minute, "%Y-%m-%dT%H:%M")
            .map_err(|e| SagaError::Corrupt(format!("journal minute `{minute}`: {e}")))?
            .and_utc();
        out.push((start, u64::try_from(n).unwrap_or(0)));
    }
    out.sort();
    Ok(out)
}
