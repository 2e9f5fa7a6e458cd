//! The one JSON envelope every event travels in, and the order event payloads.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Every message on the bus. AMQP properties repeat `message_id` and
/// `message_type` so brokers and tools can see them without parsing the body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Unique per message: the inbox key of every consumer.
    pub message_id: Uuid,
    /// `OrderCreated`, `OrderCompleted` or `OrderExpired`.
    pub message_type: String,
    /// The saga's correlation id: for orders, the order id.
    pub correlation_id: String,
    /// The message that caused this one, when there was one.
    pub causation_id: Option<Uuid>,
    /// When the event happened.
    pub occurred_at: DateTime<Utc>,
    /// The user who started the flow.
    pub initiated_by: Option<i64>,
    /// The event's data ([`OrderEventPayload`] for order events).
    pub payload: serde_json::Value,
}

/// One line of an order, as the saga remembers it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    /// `products.id`.
    pub product_id: i64,
    /// The product's name when ordered.
    pub product_name: String,
    /// Units ordered.
    pub quantity: i32,
    /// Price of one unit when ordered.
    pub unit_price: Decimal,
}

/// What the order saga keeps about its order (`saga_instances.data`), copied
/// into every event it publishes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderSnapshot {
    /// `orders.id`.
    pub order_id: i64,
    /// Who placed it.
    pub user_id: i64,
    /// Their e-mail address.
    pub user_email: String,
    /// Their name.
    pub user_name: String,
    /// Sum of the lines.
    pub total: Decimal,
    /// The lines.
    pub items: Vec<OrderLine>,
}

/// Payload of `OrderCreated`, `OrderCompleted` and `OrderExpired`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderEventPayload {
    #[serde(flatten)]
    /// The order as placed.
    pub order: OrderSnapshot,
    /// Status before the event (`None` for `OrderCreated`).
    pub previous_status: Option<String>,
    /// Status after it.
    pub status: String,
}

impl Envelope {
    /// Reads an envelope from a message body.
    pub fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// Reads the payload of an order event.
    pub fn order_payload(&self) -> Result<OrderEventPayload, serde_json::Error> {
        serde_json::from_value(self.payload.clone())
    }
}
