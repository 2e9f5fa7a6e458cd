//! How messages leave and arrive. RabbitMQ in production; the trait leaves room
//! for an in-process transport in the embedded single-process mode.

use async_trait::async_trait;
use futures_util::stream::BoxStream;
use uuid::Uuid;

use crate::error::TransportError;
use crate::trace::TraceContext;

#[cfg(feature = "kafka")]
pub mod kafka;
pub mod memory;
pub mod rabbitmq;
pub mod status;

/// A message to publish on the events exchange.
#[derive(Clone, Debug)]
pub struct OutgoingMessage {
    /// Becomes the AMQP `message_id` property.
    pub message_id: Uuid,
    /// Becomes the AMQP `type` property.
    pub message_type: String,
    /// Becomes the AMQP `correlation_id` property (the saga instance's correlation id).
    pub correlation_id: String,
    /// Where the topic exchange routes it.
    pub routing_key: String,
    /// The JSON envelope.
    pub body: Vec<u8>,
    /// Becomes the `traceparent` / `tracestate` headers (W3C trace context).
    pub trace: Option<TraceContext>,
}

/// Settles a delivery with the broker.
#[async_trait]
pub trait Acknowledger: Send + Sync {
    /// The message is done with (handled, skipped as duplicate, or dead-lettered).
    async fn ack(&self) -> Result<(), TransportError>;
    /// Give the message back to the queue for another try.
    async fn requeue(&self) -> Result<(), TransportError>;

    /// Acknowledges `batch`: deliveries of one subscription that were
    /// committed together (this acknowledger is one of them). A transport
    /// that can settle several deliveries in one frame overrides it; by
    /// default each is acknowledged on its own. One result per delivery of
    /// `batch`, in its order.
    async fn ack_batch(&self, batch: &[&dyn Acknowledger]) -> Vec<Result<(), TransportError>> {
        let mut results = Vec::with_capacity(batch.len());
        for acker in batch {
            results.push(acker.ack().await);
        }
        results
    }

    /// This acknowledger as [`std::any::Any`], for transports whose
    /// [`Acknowledger::ack_batch`] needs to see its own type. `None` by
    /// default.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }
}

/// A consumed message.
pub struct Delivery {
    /// The message body.
    pub body: Vec<u8>,
    /// The routing key it was published with.
    pub routing_key: String,
    /// The AMQP `message_id` property.
    pub message_id: Option<String>,
    /// The AMQP `type` property.
    pub message_type: Option<String>,
    /// Whether the broker delivered it before (an earlier consumer did not settle it).
    pub redelivered: bool,
    /// The `traceparent` / `tracestate` headers, when present and valid.
    pub trace: Option<TraceContext>,
    /// Settles the delivery.
    pub acker: Box<dyn Acknowledger>,
}

/// A consumer queue and the routing keys bound to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueSpec {
    /// The queue's name.
    pub name: String,
    /// Routing keys bound to it on the events exchange.
    pub routing_keys: Vec<String>,
}

impl QueueSpec {
    /// Where messages this queue's consumer gave up on go.
    pub fn error_queue(&self) -> String {
        format!("{}.error", self.name)
    }
}

#[async_trait]
/// How messages are published and consumed: RabbitMQ in production, in-process in the embedded mode and in tests.
pub trait Transport: Send + Sync + 'static {
    /// Publishes every message (all in flight at once) and reports, per
    /// message and in order, whether the broker confirmed it.
    async fn publish(
        &self,
        messages: &[OutgoingMessage],
    ) -> Result<Vec<Result<(), TransportError>>, TransportError>;

    /// Starts consuming `queue` with at most `prefetch` unacknowledged messages.
    async fn subscribe(
        &self,
        queue: &QueueSpec,
        consumer_tag: &str,
        prefetch: u16,
    ) -> Result<BoxStream<'static, Result<Delivery, TransportError>>, TransportError>;

    /// Moves a delivery to the queue's error queue with the reason attached.
    /// The caller acknowledges the original afterwards.
    async fn dead_letter(
        &self,
        queue: &QueueSpec,
        delivery: &Delivery,
        reason: &str,
        attempts: u32,
    ) -> Result<(), TransportError>;

    /// Which consumers are registered on the broker and what they hold, for
    /// readiness checks. `None` when the transport does not track them.
    fn consumer_status(&self) -> Option<status::ConsumerRegistry> {
        None
    }
}
