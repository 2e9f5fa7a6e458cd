//! The order saga's queues: names every host agrees on, derived from a
//! prefix so several deployments (or tests) can share one broker.

use saga::SagaEvent as _;
use saga::transport::QueueSpec;
use saga::transport::rabbitmq::{QueueType, Topology};

use crate::definition::OrderEvent;

/// Consumer names double as inbox keys: renaming one re-handles old messages.
pub const ORDER_SAGA_CONSUMER: &str = "order-saga";
/// Consumer name (inbox key) of the notifications consumer.
pub const NOTIFICATIONS_CONSUMER: &str = "notifications";

/// The saga's `OrderCreated` queue.
pub fn saga_queue(prefix: &str) -> QueueSpec {
    QueueSpec {
        name: format!("{prefix}.{ORDER_SAGA_CONSUMER}"),
        routing_keys: vec![OrderEvent::OrderCreated.routing_key().to_owned()],
    }
}

/// The notifications queue: every order event.
pub fn notifications_queue(prefix: &str) -> QueueSpec {
    QueueSpec {
        name: format!("{prefix}.{NOTIFICATIONS_CONSUMER}"),
        routing_keys: OrderEvent::ALL
            .iter()
            .map(|e| e.routing_key().to_owned())
            .collect(),
    }
}

/// Both queues (each with its error queue).
pub fn queues(prefix: &str) -> Vec<QueueSpec> {
    vec![saga_queue(prefix), notifications_queue(prefix)]
}

/// The exchange and both queues every host declares.
pub fn topology(exchange: &str, prefix: &str, queue_type: QueueType) -> Topology {
    Topology {
        exchange: exchange.to_owned(),
        queue_type,
        queues: queues(prefix),
    }
}

/// The queue a consumer name reads (`order-saga` or `notifications`).
pub fn queue_of(consumer: &str, prefix: &str) -> Option<QueueSpec> {
    match consumer {
        ORDER_SAGA_CONSUMER => Some(saga_queue(prefix)),
        NOTIFICATIONS_CONSUMER => Some(notifications_queue(prefix)),
        _ => None,
    }
}
