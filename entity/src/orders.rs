use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

/// An order. `status` mirrors the order saga's state and is only ever
/// written by the saga engine (and by the API when the order is created).
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize, Deserialize)]
#[sea_orm(table_name = "orders")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub user_id: i64,
    pub status: String,
    #[sea_orm(column_type = "Decimal(Some((12, 2)))")]
    pub total: Decimal,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
