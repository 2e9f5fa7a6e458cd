use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

/// Failed attempts of one message at one consumer that has no saga instance
/// to keep its retry budget on (e.g. notifications).
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize, Deserialize)]
#[sea_orm(table_name = "saga_message_failures")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub consumer: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub message_id: Uuid,
    pub correlation_id: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub first_failed_at: DateTimeUtc,
    pub last_failed_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
