use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

/// Durable timers: "give this input to that instance at `due_at`".
#[derive(Clone, Debug, PartialEq, DeriveEntityModel, Serialize, Deserialize)]
#[sea_orm(table_name = "saga_timers")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    /// The saga type that owns the timer: a timer worker only claims its own.
    pub saga_type: String,
    pub saga_instance_id: i64,
    pub correlation_id: String,
    /// The timer's kind; an instance has at most one timer of a kind.
    pub timer_kind: String,
    /// The timer value (the saga's `Timer` as JSON).
    #[sea_orm(column_type = "JsonBinary", nullable)]
    pub payload: Option<Json>,
    pub due_at: DateTimeUtc,
    pub created_at: DateTimeUtc,
    pub fired_at: Option<DateTimeUtc>,
    /// W3C `traceparent` of the span that scheduled the timer: its firing
    /// continues that trace.
    pub traceparent: Option<String>,
    /// W3C `tracestate` that goes with it.
    pub tracestate: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
