use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

/// One persisted saga instance: its state, version, retry budget and data.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel, Serialize, Deserialize)]
#[sea_orm(table_name = "saga_instances")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub saga_type: String,
    pub correlation_id: String,
    pub state: String,
    /// Optimistic concurrency token: every update is `WHERE version = expected`.
    pub version: i32,
    /// Failed handler attempts in the current retry budget.
    pub attempts: i32,
    pub faulted: bool,
    pub last_error: Option<String>,
    #[sea_orm(column_type = "JsonBinary")]
    pub data: Json,
    /// When the instance entered its current state (drives state timeouts).
    pub state_entered_at: DateTimeUtc,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
    /// W3C `traceparent` of the span of the instance's latest transition: the
    /// state-timeout sweep continues that trace.
    pub traceparent: Option<String>,
    /// W3C `tracestate` that goes with it.
    pub tracestate: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
