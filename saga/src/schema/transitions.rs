use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

/// The journal: one row per input a saga instance was given, applied or not.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel, Serialize, Deserialize)]
#[sea_orm(table_name = "saga_transitions")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub saga_instance_id: i64,
    /// The saga type of the instance (`saga_instances.saga_type`).
    pub saga_type: String,
    pub correlation_id: String,
    pub from_state: Option<String>,
    pub to_state: String,
    pub trigger: String,
    /// `applied`, `ignored`, `failed`, `parked` or `resumed`
    /// ([`crate::journal::JournalOutcome`]).
    pub outcome: String,
    pub message_id: Option<Uuid>,
    pub attempt: i32,
    /// The input as JSON (what the saga's `Input` serializes to), e.g. a
    /// payment draw and its decision. `None` for rows that have no input
    /// (operator actions) and rows written before inputs were kept.
    #[sea_orm(column_type = "JsonBinary", nullable)]
    pub input: Option<Json>,
    pub detail: Option<String>,
    pub error: Option<String>,
    pub occurred_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
