//! The operator-action log (`saga_operator_actions`): every action an
//! operator takes on sagas or queues, who took it and what it changed.
//!
//! A resume also writes its journal row on the instance (outcome
//! `resumed`, with the operator in its input); [`SagaEngine::resume_by`]
//! writes both in one transaction. A re-drive of an error queue has no
//! single instance: the log is its only record. Hosts record re-drives with
//! [`record`] (the counts before and after go into `detail`).
//!
//! [`SagaEngine::resume_by`]: crate::engine::SagaEngine::resume_by

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter,
    QueryOrder, QuerySelect,
};

use crate::error::SagaError;
use crate::schema::operator_actions;

/// The log's rows.
pub use crate::schema::operator_actions::Model as OperatorAction;

/// What an operator did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ActionKind {
    /// Resumed a parked instance.
    Resume,
    /// Moved dead letters from an error queue back to their queue.
    Redrive,
}

impl ActionKind {
    /// Every kind.
    pub const ALL: [ActionKind; 2] = [ActionKind::Resume, ActionKind::Redrive];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            ActionKind::Resume => "resume",
            ActionKind::Redrive => "redrive",
        }
    }

    /// The kind stored as `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

/// One action to log.
#[derive(Clone, Debug)]
pub struct NewAction<'a> {
    /// What was done.
    pub kind: ActionKind,
    /// The saga type acted on, if any.
    pub saga_type: Option<&'a str>,
    /// The instance acted on, if any.
    pub correlation_id: Option<&'a str>,
    /// The queue acted on, if any.
    pub queue: Option<&'a str>,
    /// Who did it.
    pub operator: &'a str,
    /// What it did (JSON).
    pub detail: Option<serde_json::Value>,
}

/// Which log rows to list.
#[derive(Clone, Debug, Default)]
pub struct ActionFilter {
    /// Only this kind.
    pub kind: Option<ActionKind>,
    /// Only actions on this saga type.
    pub saga_type: Option<String>,
    /// Only actions on this instance (with `saga_type`).
    pub correlation_id: Option<String>,
}

/// Logs one action (inside the caller's transaction, if it has one) and
/// returns its id.
pub async fn record<C: ConnectionTrait>(
    conn: &C,
    action: NewAction<'_>,
    at: DateTime<Utc>,
) -> Result<i64, SagaError> {
    let inserted = operator_actions::Entity::insert(operator_actions::ActiveModel {
        action: Set(action.kind.as_str().to_owned()),
        saga_type: Set(action.saga_type.map(str::to_owned)),
        correlation_id: Set(action.correlation_id.map(str::to_owned)),
        queue: Set(action.queue.map(str::to_owned)),
        operator: Set(action.operator.to_owned()),
        detail: Set(action.detail),
        at: Set(at),
        ..Default::default()
    })
    .exec(conn)
    .await?;
    Ok(inserted.last_insert_id)
}

/// One action by id.
pub async fn get<C: ConnectionTrait>(
    conn: &C,
    id: i64,
) -> Result<Option<OperatorAction>, SagaError> {
    Ok(operator_actions::Entity::find_by_id(id).one(conn).await?)
}

/// The actions `filter` selects, newest first, `limit` from `offset`, and
/// how many there are in all.
pub async fn list<C: ConnectionTrait>(
    conn: &C,
    filter: &ActionFilter,
    limit: u64,
    offset: u64,
) -> Result<(Vec<OperatorAction>, u64), SagaError> {
    use operator_actions::Column as A;
    let mut query = operator_actions::Entity::find();
    if let Some(kind) = filter.kind {
        query = query.filter(A::Action.eq(kind.as_str()));
    }
    if let Some(saga_type) = &filter.saga_type {
        query = query.filter(A::SagaType.eq(saga_type.as_str()));
    }
    if let Some(correlation_id) = &filter.correlation_id {
        query = query.filter(A::CorrelationId.eq(correlation_id.as_str()));
    }
    let total = query.clone().count(conn).await?;
    let rows = query
        .order_by_desc(A::Id)
        .limit(limit)
        .offset(offset)
        .all(conn)
        .await?;
    Ok((rows, total))
}
