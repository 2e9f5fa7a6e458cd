use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

/// An `Idempotency-Key` of `POST /api/orders`, unique per (user, key): the
/// request it was first used for and the response that request got.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel, Serialize, Deserialize)]
#[sea_orm(table_name = "idempotency_keys")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub user_id: i64,
    pub key: String,
    /// The request body in canonical form; a reuse must match it.
    pub request_fingerprint: String,
    pub response_status: Option<i32>,
    #[sea_orm(column_type = "JsonBinary", nullable)]
    pub response_body: Option<Json>,
    pub order_id: Option<i64>,
    pub created_at: DateTimeUtc,
    pub expires_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
