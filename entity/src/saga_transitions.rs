use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

/// The journal: one row per input a saga instance was given, applied or not.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel, Serialize, Deserialize)]
#[sea_orm(table_name = "saga_transitions")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub saga_instance_id: i64,
    pub correlation_id: String,
    pub from_state: Option<String>,
    pub to_state: String,
    pub trigger: String,
    /// applied | ignored
    pub outcome: String,
    pub message_id: Option<Uuid>,
    pub attempt: i32,
    pub payment_draw: Option<f64>,
    pub payment_approved: Option<bool>,
    pub detail: Option<String>,
    pub error: Option<String>,
    pub occurred_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
