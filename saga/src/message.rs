//! The one JSON envelope every message travels in.

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Every message on the bus. Transport properties repeat `message_id` and
/// `message_type` so brokers and tools can see them without parsing the body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Unique per message: the inbox key of every consumer.
    pub message_id: Uuid,
    /// The event's type, e.g. `OrderCreated`.
    pub message_type: String,
    /// The saga instance's correlation id (an order id, a shipment UUID).
    pub correlation_id: String,
    /// The message that caused this one, when there was one.
    pub causation_id: Option<Uuid>,
    /// When the event happened.
    pub occurred_at: DateTime<Utc>,
    /// The user who started the flow, when the saga knows one.
    pub initiated_by: Option<i64>,
    /// The event's data (the saga's [`crate::definition::Saga::event_payload`]).
    pub payload: serde_json::Value,
}

impl Envelope {
    /// Reads an envelope from a message body.
    pub fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// Reads the payload as `T` (a typed event contract).
    pub fn payload_as<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        T::deserialize(&self.payload)
    }
}
