//! The engine against the real database, with a manual clock and a fixed
//! payment outcome.

use chrono::Duration;
use orders::{OrderInput, OrderState};
use saga::clock::ManualClock;
use saga::engine::Handled;
use saga::schema::timers as saga_timers;
use saga::testing::TestDatabase;
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};

use crate::helpers::*;

#[tokio::test]
async fn order_created_moves_the_order_to_processing_and_schedules_the_payment_timer() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let clock = ManualClock::new(t0());
    let engine = engine(&tdb.db, &clock, true);
    let (order, created) = place_order(&tdb.db, t0()).await;
    assert_eq!(order_status(&tdb.db, order.order_id).await, "pending");

    let handled = engine
        .handle("order-saga", &created)
        .await
        .expect("handled");
    assert_eq!(
        handled,
        Handled::Applied {
            from: OrderState::Pending,
            to: OrderState::Processing,
            published: vec![],
        }
    );
    assert_eq!(order_status(&tdb.db, order.order_id).await, "processing");
    let timers = saga_timers::Entity::find()
        .filter(saga_timers::Column::CorrelationId.eq(order.order_id.to_string()))
        .all(&tdb.db)
        .await
        .expect("timers");
    assert_eq!(timers.len(), 1);
    assert_eq!(timers[0].due_at, t0() + Duration::seconds(5));
    let journal = journal_of(&tdb.db, order.order_id).await;
    let steps: Vec<_> = journal
        .iter()
        .map(|j| (j.from_state.clone(), j.to_state.clone(), j.trigger.clone()))
        .collect();
    assert_eq!(
        steps,
        vec![
            (None, "pending".to_owned(), "OrderPlaced".to_owned()),
            (
                Some("pending".to_owned()),
                "processing".to_owned(),
                "OrderCreated".to_owned()
            ),
        ]
    );
    assert_eq!(journal[1].message_id, Some(created.message_id));
    tdb.drop().await;
}

#[tokio::test]
async fn duplicate_order_created_is_processed_once_even_when_both_arrive_together() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let clock = ManualClock::new(t0());
    let engine = engine(&tdb.db, &clock, true);
    let (order, created) = place_order(&tdb.db, t0()).await;

    let (a, b) = tokio::join!(
        engine.handle("order-saga", &created),
        engine.handle("order-saga", &created),
    );
    let outcomes = [a.expect("first"), b.expect("second")];
    assert_eq!(
        outcomes
            .iter()
            .filter(|h| **h == Handled::Duplicate)
            .count(),
        1,
        "{outcomes:?}"
    );
    // A third, later redelivery is a duplicate too.
    assert_eq!(
        engine.handle("order-saga", &created).await.expect("third"),
        Handled::Duplicate
    );
    let timers = saga_timers::Entity::find()
        .filter(saga_timers::Column::CorrelationId.eq(order.order_id.to_string()))
        .count(&tdb.db)
        .await
        .expect("count");
    assert_eq!(timers, 1);
    assert_eq!(journal_of(&tdb.db, order.order_id).await.len(), 2);
    tdb.drop().await;
}

#[tokio::test]
async fn the_payment_timer_fires_only_when_due_and_an_approval_completes_the_order() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let clock = ManualClock::new(t0());
    let engine = engine(&tdb.db, &clock, true);
    let (order, created) = place_order(&tdb.db, t0()).await;
    engine
        .handle("order-saga", &created)
        .await
        .expect("handled");

    clock.advance(Duration::milliseconds(4999));
    assert_eq!(engine.try_fire_due_timer_once().await.expect("poll"), None);
    assert_eq!(order_status(&tdb.db, order.order_id).await, "processing");

    clock.advance(Duration::milliseconds(1));
    let fired = engine
        .try_fire_due_timer_once()
        .await
        .expect("poll")
        .expect("a timer was due");
    assert!(matches!(
        fired.input,
        OrderInput::PaymentDecided { approved: true, .. }
    ));
    assert_eq!(
        fired.handled,
        Handled::Applied {
            from: OrderState::Processing,
            to: OrderState::Completed,
            published: vec!["OrderCompleted"],
        }
    );
    assert_eq!(order_status(&tdb.db, order.order_id).await, "completed");
    assert_eq!(
        outbox_count(&tdb.db, order.order_id, "OrderCompleted").await,
        1
    );
    assert_eq!(engine.try_fire_due_timer_once().await.expect("poll"), None);
    let last = journal_of(&tdb.db, order.order_id)
        .await
        .pop()
        .expect("journal row");
    assert_eq!(payment_of(&last), Some((0.0, true)));
    tdb.drop().await;
}

#[tokio::test]
async fn a_declined_payment_leaves_the_order_processing_until_the_sweep_expires_it() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let clock = ManualClock::new(t0());
    let engine = engine(&tdb.db, &clock, false);
    let (order, created) = place_order(&tdb.db, t0()).await;
    engine
        .handle("order-saga", &created)
        .await
        .expect("handled");
    clock.advance(Duration::seconds(5));
    let fired = engine
        .try_fire_due_timer_once()
        .await
        .expect("poll")
        .expect("due");
    assert!(matches!(
        fired.input,
        OrderInput::PaymentDecided {
            approved: false,
            ..
        }
    ));
    assert_eq!(order_status(&tdb.db, order.order_id).await, "processing");

    // Not stale yet: 599 s after entering processing.
    clock.set(t0() + Duration::seconds(599));
    assert_eq!(engine.sweep_all().await.expect("sweep").timed_out, 0);
    clock.set(t0() + Duration::seconds(600));
    assert_eq!(engine.sweep_all().await.expect("sweep").timed_out, 1);
    assert_eq!(order_status(&tdb.db, order.order_id).await, "expired");
    assert_eq!(
        outbox_count(&tdb.db, order.order_id, "OrderExpired").await,
        1
    );
    // A second sweep finds nothing.
    assert_eq!(engine.sweep_all().await.expect("sweep").timed_out, 0);
    assert_eq!(
        outbox_count(&tdb.db, order.order_id, "OrderExpired").await,
        1
    );
    tdb.drop().await;
}

#[tokio::test]
async fn expiry_racing_a_payment_approval_ends_in_exactly_one_terminal_state() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let clock = ManualClock::new(t0());
    let engine = engine(&tdb.db, &clock, true);
    let mut orders = Vec::new();
    for _ in 0..10 {
        let (order, created) = place_order(&tdb.db, t0()).await;
        engine
            .handle("order-saga", &created)
            .await
            .expect("handled");
        orders.push(order);
    }
    // Both the payment timer and the expiry are due at once.
    clock.advance(Duration::seconds(601));
    let timers = async {
        let mut fired = 0;
        while engine
            .try_fire_due_timer_once()
            .await
            .expect("timer")
            .is_some()
        {
            fired += 1;
        }
        fired
    };
    let (fired, swept) = tokio::join!(timers, engine.sweep_all());
    let swept = swept.expect("sweep");
    assert_eq!(fired, 10, "every timer fires exactly once");
    for order in &orders {
        let status = order_status(&tdb.db, order.order_id).await;
        let completed = outbox_count(&tdb.db, order.order_id, "OrderCompleted").await;
        let expired = outbox_count(&tdb.db, order.order_id, "OrderExpired").await;
        assert_eq!(
            completed + expired,
            1,
            "order {}: one terminal event",
            order.order_id
        );
        match status.as_str() {
            "completed" => assert_eq!(completed, 1),
            "expired" => assert_eq!(expired, 1),
            other => panic!("order {} ended {other}", order.order_id),
        }
    }
    let expired_total: u64 = {
        let mut n = 0;
        for order in &orders {
            n += outbox_count(&tdb.db, order.order_id, "OrderExpired").await;
        }
        n
    };
    assert_eq!(swept.timed_out as u64, expired_total);
    tdb.drop().await;
}

#[tokio::test]
async fn two_schedulers_sweeping_at_once_expire_each_order_once() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let clock = ManualClock::new(t0());
    let a = engine(&tdb.db, &clock, false);
    let b = engine(&tdb.db, &clock, false);
    let mut orders = Vec::new();
    for _ in 0..120 {
        let (order, created) = place_order(&tdb.db, t0()).await;
        a.handle("order-saga", &created).await.expect("handled");
        orders.push(order);
    }
    clock.advance(Duration::seconds(700));
    let (ra, rb) = tokio::join!(a.sweep_all(), b.sweep_all());
    let total = ra.expect("a").timed_out + rb.expect("b").timed_out;
    assert_eq!(total, 120);
    for order in &orders {
        assert_eq!(order_status(&tdb.db, order.order_id).await, "expired");
        assert_eq!(
            outbox_count(&tdb.db, order.order_id, "OrderExpired").await,
            1
        );
    }
    tdb.drop().await;
}

#[tokio::test]
async fn an_order_created_for_an_unknown_order_is_an_error_not_a_silent_success() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let clock = ManualClock::new(t0());
    let engine = engine(&tdb.db, &clock, true);
    let (_, mut created) = place_order(&tdb.db, t0()).await;
    created.message_id = uuid::Uuid::new_v4();
    created.correlation_id = "999999".into();
    let err = engine
        .handle("order-saga", &created)
        .await
        .expect_err("unknown instance");
    assert!(!err.is_retryable(), "{err}");
    assert!(err.to_string().contains("999999"), "{err}");
    tdb.drop().await;
}
