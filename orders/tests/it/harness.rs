//! The order saga through the generic `saga::testing::harness` (as
//! `orders::testing::OrderHarness`): the real engine, relay and consumers
//! in-process, a virtual clock, no services and no waiting.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use chrono::Duration;
use orders::OrderSaga;
use orders::testing::OrderHarness;
use orders::{OrderInput, OrderState};
use saga::SagaError;
use saga::consumer::ConsumeOutcome;
use saga::engine::ApplyProbe;
use saga::schema::instances as saga_instances;
use saga::transport::memory::QueuedMessage;

fn outcomes(h: &OrderHarness, consumer: &str, order: i64) -> Vec<(String, ConsumeOutcome)> {
    h.consumed()
        .into_iter()
        .filter(|c| c.consumer == consumer && c.correlation_id == Some(order.to_string()))
        .map(|c| (c.message_type.unwrap_or_default(), c.outcome))
        .collect()
}

#[tokio::test]
async fn an_approved_order_completes_exactly_when_the_payment_timer_is_due() {
    let h = OrderHarness::builder()
        .approve_payments(true)
        .start()
        .await
        .expect("harness");
    let order = h.place_order(2).await.expect("order");
    h.run_until_idle().await.expect("idle");
    assert_eq!(
        h.order_state(order).await.expect("state"),
        OrderState::Processing
    );

    h.advance(Duration::milliseconds(4_999))
        .await
        .expect("idle");
    assert_eq!(
        h.order_state(order).await.expect("state"),
        OrderState::Processing
    );
    h.advance(Duration::milliseconds(1)).await.expect("idle");
    assert_eq!(
        h.order_state(order).await.expect("state"),
        OrderState::Completed
    );

    assert_eq!(
        h.published_types(&order.to_string()),
        ["OrderCreated", "OrderCompleted"]
    );
    let handled = ConsumeOutcome::Handled { attempts: 1 };
    assert_eq!(
        outcomes(&h, "order-saga", order),
        [("OrderCreated".to_owned(), handled.clone())]
    );
    assert_eq!(
        outcomes(&h, "notifications", order),
        [
            ("OrderCreated".to_owned(), handled.clone()),
            ("OrderCompleted".to_owned(), handled)
        ]
    );
    let kinds: Vec<String> = h
        .notifications(order)
        .await
        .expect("notifications")
        .into_iter()
        .map(|n| n.event_type)
        .collect();
    assert_eq!(kinds, ["OrderCreated", "OrderCompleted"]);
}

#[tokio::test]
async fn a_declined_order_expires_at_the_timeout_and_a_duplicate_changes_nothing() {
    let h = OrderHarness::builder()
        .approve_payments(false)
        .start()
        .await
        .expect("harness");
    let order = h.place_order(1).await.expect("order");
    h.advance(Duration::seconds(5)).await.expect("declined");
    assert_eq!(
        h.order_state(order).await.expect("state"),
        OrderState::Processing
    );
    h.advance(Duration::seconds(599)).await.expect("idle");
    assert_eq!(
        h.order_state(order).await.expect("state"),
        OrderState::Processing
    );
    h.advance(Duration::seconds(1)).await.expect("idle");
    assert_eq!(
        h.order_state(order).await.expect("state"),
        OrderState::Expired
    );
    assert_eq!(
        h.published_types(&order.to_string()),
        ["OrderCreated", "OrderExpired"]
    );

    // The same OrderCreated delivered again is skipped by the inbox.
    let created = h
        .published()
        .into_iter()
        .find(|m| m.message_type == "OrderCreated")
        .expect("OrderCreated");
    let mut again = QueuedMessage::new(created.routing_key.clone(), created.body.clone());
    again.message_id = Some(created.message_id.to_string());
    h.transport()
        .publish_to_queue("harness.order-saga", again)
        .expect("inject");
    h.run_until_idle().await.expect("idle");
    assert_eq!(
        outcomes(&h, "order-saga", order)
            .last()
            .map(|(_, o)| o.clone()),
        Some(ConsumeOutcome::Duplicate)
    );
    assert_eq!(
        h.order_state(order).await.expect("state"),
        OrderState::Expired
    );
    assert_eq!(
        h.published_types(&order.to_string()),
        ["OrderCreated", "OrderExpired"]
    );
}

/// Fails every write until told otherwise.
struct Broken(AtomicUsize);

#[async_trait]
impl ApplyProbe<OrderSaga> for Broken {
    async fn before_write(
        &self,
        _instance: &saga_instances::Model,
        _input: &OrderInput,
    ) -> Result<(), SagaError> {
        if self.0.load(Ordering::SeqCst) > 0 {
            self.0.fetch_sub(1, Ordering::SeqCst);
            return Err(SagaError::Db(sea_orm::DbErr::Custom(
                "effect failed".into(),
            )));
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_saga_whose_budget_is_spent_is_parked_and_resumes() {
    let broken = Arc::new(Broken(AtomicUsize::new(3)));
    let h = OrderHarness::builder()
        .probe(broken.clone())
        .start()
        .await
        .expect("harness");
    let order = h.place_order(1).await.expect("order");
    h.run_until_idle().await.expect("idle");
    let parked = h.instance(&order.to_string()).await.expect("instance");
    assert!(parked.parked);
    assert_eq!(parked.attempts, 3);
    assert!(matches!(
        outcomes(&h, "order-saga", order).as_slice(),
        [(_, ConsumeOutcome::DeadLettered { attempts: 3, .. })]
    ));
    let letters = h
        .transport()
        .messages("harness.order-saga.error")
        .expect("error queue");
    assert_eq!(letters.len(), 1);
    assert_eq!(
        letters[0].headers.get("x-attempts").map(String::as_str),
        Some("3")
    );

    // Parked: time passing changes nothing.
    h.advance(Duration::seconds(3600)).await.expect("idle");
    assert_eq!(
        h.order_state(order).await.expect("state"),
        OrderState::Pending
    );

    let resumed = h.engine().resume(&order.to_string()).await.expect("resume");
    assert_eq!(resumed.state, OrderState::Pending);
    h.advance(Duration::seconds(5)).await.expect("idle");
    assert_eq!(
        h.order_state(order).await.expect("state"),
        OrderState::Completed
    );
    let outcomes: Vec<String> = h
        .journal(&order.to_string())
        .await
        .expect("journal")
        .into_iter()
        .map(|j| format!("{}:{}", j.trigger, j.outcome))
        .collect();
    assert_eq!(
        outcomes,
        [
            "OrderPlaced:applied",
            "OrderCreated:failed",
            "OrderCreated:failed",
            "OrderCreated:parked",
            "Resumed:resumed",
            "OrderCreated:applied",
            "PaymentDecided:applied"
        ]
    );
}
