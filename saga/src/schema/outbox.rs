use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

/// Events waiting to be published (transactional outbox).
#[derive(Clone, Debug, PartialEq, DeriveEntityModel, Serialize, Deserialize)]
#[sea_orm(table_name = "saga_outbox")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    #[sea_orm(unique)]
    pub message_id: Uuid,
    pub message_type: String,
    pub routing_key: String,
    pub correlation_id: String,
    /// The whole message envelope as it goes on the wire.
    #[sea_orm(column_type = "JsonBinary")]
    pub body: Json,
    pub created_at: DateTimeUtc,
    /// A relay that claimed the row holds it until then.
    pub locked_until: Option<DateTimeUtc>,
    pub sent_at: Option<DateTimeUtc>,
    pub publish_attempts: i32,
    pub last_error: Option<String>,
    /// W3C `traceparent` of the span that wrote the row; the relay sends it
    /// as the message's `traceparent` header.
    pub traceparent: Option<String>,
    /// W3C `tracestate` that goes with it.
    pub tracestate: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
