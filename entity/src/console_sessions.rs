use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

/// A session of the operator console: the SHA-256 (hex) of the cookie's
/// token, never the token itself.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize, Deserialize)]
#[sea_orm(table_name = "console_sessions")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    #[sea_orm(unique)]
    #[serde(skip_serializing)]
    pub token_hash: String,
    pub user_id: i64,
    /// The synchronizer token every POST of this session must carry.
    #[serde(skip_serializing)]
    pub csrf_token: String,
    pub created_at: DateTimeUtc,
    pub expires_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
