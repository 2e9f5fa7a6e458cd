//! The one JSON envelope every event travels in, and the order event payloads.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Every message on the bus. AMQP properties repeat `message_id` and
/// `message_type` so brokers and tools can see them without parsing the body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub message_id: Uuid,
    pub message_type: String,
    /// The saga's correlation id: for orders, the order id.
    pub correlation_id: String,
    /// The message that caused this one, when there was one.
    pub causation_id: Option<Uuid>,
    pub occurred_at: DateTime<Utc>,
    /// The user who started the flow.
    pub initiated_by: Option<i64>,
    pub payload: serde_json::Value,
}

/// One line of an order, as the saga remembers it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    pub product_id: i64,
    pub product_name: String,
    pub quantity: i32,
    pub unit_price: Decimal,
}

/// What the order saga keeps about its order (`saga_instances.data`), copied
/// into every event it publishes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderSnapshot {
    pub order_id: i64,
    pub user_id: i64,
    pub user_email: String,
    pub user_name: String,
    pub total: Decimal,
    pub items: Vec<OrderLine>,
}

/// Payload of `OrderCreated`, `OrderCompleted` and `OrderExpired`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderEventPayload {
    #[serde(flatten)]
    pub order: OrderSnapshot,
    pub previous_status: Option<String>,
    pub status: String,
}

impl Envelope {
    pub fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    pub fn order_payload(&self) -> Result<OrderEventPayload, serde_json::Error> {
        serde_json::from_value(self.payload.clone())
    }
}
