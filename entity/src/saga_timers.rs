use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

/// Durable timers: "give this input to that instance at `due_at`".
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize, Deserialize)]
#[sea_orm(table_name = "saga_timers")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub saga_instance_id: i64,
    pub correlation_id: String,
    pub timer_kind: String,
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
