//! The queue contract every host agrees on. Names are derived from a prefix so
//! several deployments (or tests) can share one broker without crossing.

use crate::machine::OrderEvent;
use crate::transport::QueueSpec;
use crate::transport::rabbitmq::{QueueType, Topology};

/// Consumer names double as inbox keys: renaming one re-handles old messages.
pub const ORDER_SAGA_CONSUMER: &str = "order-saga";
/// Consumer name (inbox key) of the notifications consumer.
pub const NOTIFICATIONS_CONSUMER: &str = "notifications";

/// The saga's `OrderCreated` queue.
pub fn saga_queue(prefix: &str) -> QueueSpec {
    QueueSpec {
        name: format!("{prefix}.order-saga"),
        routing_keys: vec![OrderEvent::OrderCreated.routing_key().to_owned()],
    }
}

/// The notifications queue: every order event.
pub fn notifications_queue(prefix: &str) -> QueueSpec {
    QueueSpec {
        name: format!("{prefix}.notifications"),
        routing_keys: [
            OrderEvent::OrderCreated,
            OrderEvent::OrderCompleted,
            OrderEvent::OrderExpired,
        ]
        .iter()
        .map(|e| e.routing_key().to_owned())
        .collect(),
    }
}

/// The exchange and both queues (with their error queues) every host declares.
pub fn topology(exchange: &str, prefix: &str, queue_type: QueueType) -> Topology {
    Topology {
        exchange: exchange.to_owned(),
        queue_type,
        queues: vec![saga_queue(prefix), notifications_queue(prefix)],
    }
}
