//! The shipment saga's queues, named from a prefix so several deployments
//! (or tests) can share one broker.

use saga::SagaEvent as _;
use saga::transport::QueueSpec;

use crate::definition::{ShipmentEvent, ShipmentMessage};

/// The saga's consumer name, which is also its inbox key: renaming it
/// re-handles old messages.
pub const SHIPMENT_SAGA_CONSUMER: &str = "shipment-saga";
/// The consumer of the saga's own events (what another service would be).
pub const SHIPMENT_EVENTS_CONSUMER: &str = "shipment-events";

/// The saga's queue: every message it consumes.
pub fn saga_queue(prefix: &str) -> QueueSpec {
    QueueSpec {
        name: format!("{prefix}.{SHIPMENT_SAGA_CONSUMER}"),
        routing_keys: ShipmentMessage::ALL
            .iter()
            .map(|m| m.routing_key().to_owned())
            .collect(),
    }
}

/// A queue of every event the saga publishes (the outbox relay publishes
/// with `mandatory`: an event no queue takes is not confirmed).
pub fn events_queue(prefix: &str) -> QueueSpec {
    QueueSpec {
        name: format!("{prefix}.{SHIPMENT_EVENTS_CONSUMER}"),
        routing_keys: ShipmentEvent::ALL
            .iter()
            .map(|e| e.routing_key().to_owned())
            .collect(),
    }
}

/// Both queues (each with its error queue).
pub fn queues(prefix: &str) -> Vec<QueueSpec> {
    vec![saga_queue(prefix), events_queue(prefix)]
}
