//! What the operator console builds on, through the in-process harness
//! (SQLite): `saga::inspect` (instances by filter, one instance's journal,
//! timers and outbox, decided instances per minute), `resume_by` and the
//! operator-action log. `hosts/tests/console.rs` runs the same queries on
//! PostgreSQL through the console.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use chrono::{Duration, DurationRound};
use orders::testing::OrderHarness;
use orders::{OrderInput, OrderSaga, OrderState};
use saga::SagaError;
use saga::admin::{SagaAdmin, Sagas};
use saga::clock::Clock as _;
use saga::engine::ApplyProbe;
use saga::inspect::{self, InstanceFilter};
use saga::operator::{self, ActionFilter, ActionKind};
use saga::schema::instances as saga_instances;

/// Fails the first `n` writes.
struct FailFirst(AtomicUsize);

#[async_trait]
impl ApplyProbe<OrderSaga> for FailFirst {
    async fn before_write(
        &self,
        _instance: &saga_instances::Model,
        _input: &OrderInput,
    ) -> Result<(), SagaError> {
        if self
            .0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(SagaError::Db(sea_orm::DbErr::Custom(
                "effect failed: <script>alert(1)</script>".into(),
            )));
        }
        Ok(())
    }
}

#[tokio::test]
async fn resume_by_names_the_operator_in_the_journal_and_in_the_action_log() {
    let h = OrderHarness::builder()
        .probe(Arc::new(FailFirst(AtomicUsize::new(3))))
        .start()
        .await
        .expect("harness");
    let order = h.place_order(1).await.expect("order").to_string();
    h.run_until_idle().await.expect("idle");
    assert!(h.instance(&order).await.expect("instance").parked);

    let sagas = Sagas::new().with(h.engine().clone());
    let resumed = sagas
        .get("order")
        .expect("order saga")
        .resume_by(&order, "admin@example.com (user 1)")
        .await
        .expect("resume");
    assert_eq!(resumed.state, "pending");

    let journal = h.journal(&order).await.expect("journal");
    let row = journal
        .iter()
        .find(|j| j.outcome == "resumed")
        .expect("a resumed row");
    assert_eq!(
        row.input,
        Some(serde_json::json!({"operator": "admin@example.com (user 1)"}))
    );
    assert!(
        row.detail
            .as_deref()
            .is_some_and(|d| d.starts_with("resumed by admin@example.com (user 1)")),
        "{row:?}"
    );

    let (actions, total) = operator::list(h.db(), &ActionFilter::default(), 10, 0)
        .await
        .expect("actions");
    assert_eq!(total, 1);
    let action = &actions[0];
    assert_eq!(ActionKind::parse(&action.action), Some(ActionKind::Resume));
    assert_eq!(action.saga_type.as_deref(), Some("order"));
    assert_eq!(action.correlation_id.as_deref(), Some(order.as_str()));
    assert_eq!(action.operator, "admin@example.com (user 1)");
    let detail = action.detail.clone().expect("detail");
    assert_eq!(detail["state"], "pending");
    assert_eq!(detail["attempts"], 3);

    // The old call still works and logs no action (it knows no operator).
    h.advance(Duration::seconds(10)).await.expect("idle");
    assert_eq!(
        h.order_state(order.parse().expect("id"))
            .await
            .expect("state"),
        OrderState::Completed
    );
    let (_, total) = operator::list(h.db(), &ActionFilter::default(), 10, 0)
        .await
        .expect("actions");
    assert_eq!(total, 1);
}

#[tokio::test]
async fn inspect_filters_and_pages_instances_and_counts_decisions_per_minute() {
    let h = OrderHarness::builder()
        .approve_payments(true)
        .start()
        .await
        .expect("harness");
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(h.place_order(1).await.expect("order").to_string());
    }
    h.run_until_idle().await.expect("idle");
    // All five complete when their payment timers fire...
    h.advance(Duration::seconds(5)).await.expect("idle");
    let first_minute = h.clock().now();
    // ...then two more orders, completed a few minutes later.
    h.advance(Duration::minutes(3)).await.expect("idle");
    for _ in 0..2 {
        ids.push(h.place_order(1).await.expect("order").to_string());
    }
    h.run_until_idle().await.expect("idle");
    h.advance(Duration::seconds(5)).await.expect("idle");
    let later_minute = h.clock().now();
    let one = h.place_order(1).await.expect("order").to_string();
    h.run_until_idle().await.expect("idle");

    let all = InstanceFilter::default();
    let (page, total) = inspect::instances(h.db(), &all, 3, 0).await.expect("page");
    assert_eq!(total, 8);
    assert_eq!(page.len(), 3);
    assert_eq!(page[0].correlation_id, one, "newest first");
    let (rest, _) = inspect::instances(h.db(), &all, 10, 6)
        .await
        .expect("page 3");
    assert_eq!(rest.len(), 2);

    let processing = InstanceFilter {
        saga_type: Some("order".into()),
        state: Some("processing".into()),
        ..InstanceFilter::default()
    };
    let (found, total) = inspect::instances(h.db(), &processing, 10, 0)
        .await
        .expect("processing");
    assert_eq!((found.len(), total), (1, 1));
    assert_eq!(found[0].correlation_id, one);
    let by_id = InstanceFilter {
        correlation_id: Some(ids[2].clone()),
        ..InstanceFilter::default()
    };
    let (found, _) = inspect::instances(h.db(), &by_id, 10, 0)
        .await
        .expect("by id");
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].state, "completed");
    let parked = InstanceFilter {
        parked: Some(true),
        ..InstanceFilter::default()
    };
    assert_eq!(
        inspect::instances(h.db(), &parked, 10, 0)
            .await
            .expect("parked")
            .1,
        0
    );

    let instance = inspect::instance(h.db(), "order", &one)
        .await
        .expect("instance")
        .expect("exists");
    let journal = inspect::journal(h.db(), instance.id, 100)
        .await
        .expect("journal");
    assert_eq!(
        journal
            .iter()
            .map(|j| j.trigger.as_str())
            .collect::<Vec<_>>(),
        ["OrderPlaced", "OrderCreated"]
    );
    let timers = inspect::pending_timers(h.db(), instance.id)
        .await
        .expect("timers");
    assert_eq!(timers.len(), 1);
    assert_eq!(timers[0].timer_kind, "payment_due");
    let events = inspect::outbox_events(h.db(), &one, 10)
        .await
        .expect("outbox");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].message_type, "OrderCreated");

    let graph = h.engine().graph();
    let since = h.clock().now() - Duration::hours(1);
    let minutes = inspect::decided_per_minute(h.db(), "order", &graph.final_states(), since)
        .await
        .expect("per minute");
    let minute =
        |t: chrono::DateTime<chrono::Utc>| t.duration_trunc(Duration::minutes(1)).expect("minute");
    assert_eq!(
        minutes,
        [(minute(first_minute), 5), (minute(later_minute), 2)]
    );
    let none = inspect::decided_per_minute(
        h.db(),
        "order",
        &graph.final_states(),
        h.clock().now() + Duration::seconds(1),
    )
    .await
    .expect("none after the last one");
    assert!(none.is_empty(), "{none:?}");
}
