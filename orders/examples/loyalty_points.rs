//! Another service built on the `saga` crate: a loyalty service that awards
//! points when an order completes.
//!
//! It declares a queue of its own, bound to `order.completed` on the
//! order-saga events exchange, and consumes it with the crate's [`Consumer`]
//! (manual acks, retries, an error queue) and typed contracts
//! ([`Envelope`], [`OrderEventPayload`]). Start the order-saga hosts, place an
//! order that gets paid, and run:
//!
//! ```text
//! cargo run -p saga --example loyalty_points            # until Ctrl-C
//! cargo run -p saga --example loyalty_points -- 3       # stop after 3 orders
//! ```
//!
//! `AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`) and
//! `ORDER_SAGA_EXCHANGE` (default `order_saga.events`) say where to listen.
//! A real service would keep points in its own database and record the
//! message id in an inbox in the same transaction, as the crate's own
//! handlers do; this one keeps them in memory to stay small.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use orders::OrderEvent;
use orders::contracts::OrderEventPayload;
use rust_decimal::Decimal;
use saga::consumer::{Consumer, HandlerOutcome, MessageHandler, RetryPolicy};
use saga::message::Envelope;
use saga::retry::Attempts;
use saga::transport::QueueSpec;
use saga::transport::rabbitmq::{QueueType, RabbitTransport, Topology};
use saga::{SagaError, SagaEvent as _};
use tokio_util::sync::CancellationToken;

/// One point per whole currency unit spent.
struct LoyaltyPoints {
    points: Mutex<HashMap<i64, Decimal>>,
    seen: Mutex<Vec<uuid::Uuid>>,
    stop_after: Option<usize>,
    done: CancellationToken,
}

#[async_trait]
impl MessageHandler for LoyaltyPoints {
    async fn handle(&self, envelope: &Envelope) -> Result<HandlerOutcome, SagaError> {
        if envelope.message_type != OrderEvent::OrderCompleted.message_type() {
            return Err(SagaError::Malformed(format!(
                "loyalty only handles OrderCompleted, got {}",
                envelope.message_type
            )));
        }
        let mut seen = self
            .seen
            .lock()
            .map_err(|_| SagaError::Corrupt("lock".into()))?;
        if seen.contains(&envelope.message_id) {
            return Ok(HandlerOutcome::Duplicate);
        }
        let payload: OrderEventPayload = envelope
            .payload_as::<OrderEventPayload>()
            .map_err(|e| SagaError::Malformed(e.to_string()))?;
        let order = &payload.order;
        let earned = order.total.floor();
        let balance = {
            let mut points = self
                .points
                .lock()
                .map_err(|_| SagaError::Corrupt("lock".into()))?;
            let entry = points.entry(order.user_id).or_default();
            *entry += earned;
            *entry
        };
        seen.push(envelope.message_id);
        tracing::info!(
            order_id = order.order_id,
            user = %order.user_email,
            earned = %earned,
            balance = %balance,
            "loyalty points awarded"
        );
        if self.stop_after.is_some_and(|n| seen.len() >= n) {
            self.done.cancel();
        }
        Ok(HandlerOutcome::Done)
    }

    async fn record_failure(
        &self,
        _envelope: &Envelope,
        error: &SagaError,
    ) -> Result<Attempts, SagaError> {
        // No database here: give up at once on anything that is not retryable.
        Ok(Attempts {
            spent: 1,
            exhausted: !error.is_retryable(),
        })
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info,lapin=warn"))
        .with_writer(std::io::stderr)
        .init();
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let exchange =
        std::env::var("ORDER_SAGA_EXCHANGE").unwrap_or_else(|_| "order_saga.events".to_owned());
    let stop_after = std::env::args().nth(1).and_then(|n| n.parse().ok());

    let queue = QueueSpec {
        name: "loyalty.order-completed".to_owned(),
        routing_keys: vec![OrderEvent::OrderCompleted.routing_key().to_owned()],
    };
    let transport =
        RabbitTransport::connect(&url, &exchange, Duration::from_secs(5), "loyalty").await?;
    transport
        .declare(&Topology {
            exchange: exchange.clone(),
            queue_type: QueueType::Classic,
            queues: vec![queue.clone()],
        })
        .await?;
    let done = CancellationToken::new();
    let handler = Arc::new(LoyaltyPoints {
        points: Mutex::new(HashMap::new()),
        seen: Mutex::new(Vec::new()),
        stop_after,
        done: done.clone(),
    });
    let consumer = Consumer::new(
        Arc::new(transport.clone()),
        queue,
        "loyalty",
        handler,
        RetryPolicy::default(),
        16,
    );
    tracing::info!(%exchange, "waiting for OrderCompleted events (Ctrl-C to stop)");
    let ctrl_c = done.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            ctrl_c.cancel();
        }
    });
    consumer.run_until_stopped(done).await?;
    transport.close().await;
    Ok(())
}
