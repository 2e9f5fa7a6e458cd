//! Batches: many inputs, one transaction, written set-based; a poison input
//! is retried alone. "One transaction" is shown by PostgreSQL itself: rows
//! written by one transaction share its id (`xmin`).

use std::sync::Arc;
use std::time::Duration as StdDuration;

use chrono::Duration;
use entity::products;
use orders::topology::{self, ORDER_SAGA_CONSUMER};
use orders::{OrderInput, OrderSaga, OrderState};
use saga::clock::ManualClock;
use saga::engine::{EngineSettings, Handled, Incoming, SagaEngine};
use saga::message::Envelope;
use saga::outbox::{OutboxHandle, OutboxRelay, RelaySettings};
use saga::testing::{TestBroker, TestDatabase};
use saga::transport::Transport;
use sea_orm::{ConnectionTrait, DatabaseConnection, EntityTrait, Statement};

use crate::helpers::*;

/// How many transactions wrote the rows `sql` selects (its one column `xmin`).
async fn transactions(db: &DatabaseConnection, sql: &str) -> i64 {
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            format!("SELECT count(DISTINCT xmin::text) AS n FROM ({sql}) AS t"),
        ))
        .await
        .expect("xmin query")
        .expect("a row");
    row.try_get("", "n").expect("n")
}

async fn stock(db: &DatabaseConnection, product: i64) -> i32 {
    products::Entity::find_by_id(product)
        .one(db)
        .await
        .expect("product")
        .expect("exists")
        .stock
}

#[tokio::test]
async fn a_batch_of_messages_is_one_transaction_and_each_message_is_handled_once() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let clock = ManualClock::new(t0());
    let engine = engine(&tdb.db, &clock, true);
    let mut created = Vec::new();
    for _ in 0..20 {
        created.push(place_order(&tdb.db, t0()).await);
    }
    // The same message twice in the batch, and one handled before it.
    let first = engine
        .handle(ORDER_SAGA_CONSUMER, &created[0].1)
        .await
        .expect("single");
    assert!(matches!(first, Handled::Applied { .. }), "{first:?}");
    let mut envelopes: Vec<Envelope> = created.iter().map(|(_, e)| e.clone()).collect();
    envelopes.push(created[5].1.clone());
    let span = tracing::Span::none();
    let batch: Vec<Incoming<'_>> = envelopes
        .iter()
        .map(|envelope| Incoming {
            envelope,
            span: &span,
        })
        .collect();
    let handled = engine
        .handle_batch(ORDER_SAGA_CONSUMER, &batch)
        .await
        .expect("batch");
    assert_eq!(handled.len(), 21);
    assert_eq!(handled[0], Handled::Duplicate, "handled before the batch");
    assert_eq!(handled[20], Handled::Duplicate, "twice in the batch");
    for h in &handled[1..20] {
        assert_eq!(
            *h,
            Handled::Applied {
                from: OrderState::Pending,
                to: OrderState::Processing,
                published: vec![],
            }
        );
    }
    for (order, _) in &created {
        assert_eq!(order_status(&tdb.db, order.order_id).await, "processing");
    }
    // 19 instances, their orders, journal rows, timers and inbox rows: one
    // transaction.
    let ids: Vec<String> = created[1..]
        .iter()
        .map(|(o, _)| o.order_id.to_string())
        .collect();
    let list = ids.join(",");
    for sql in [
        format!(
            "SELECT xmin FROM saga_instances WHERE correlation_id IN ('{}')",
            ids.join("','")
        ),
        format!("SELECT xmin FROM orders WHERE id IN ({list})"),
        format!(
            "SELECT xmin FROM saga_transitions WHERE trigger = 'OrderCreated' AND correlation_id IN ('{}')",
            ids.join("','")
        ),
        format!(
            "SELECT xmin FROM saga_timers WHERE correlation_id IN ('{}')",
            ids.join("','")
        ),
    ] {
        assert_eq!(transactions(&tdb.db, &sql).await, 1, "{sql}");
    }
    // Each has one timer, due 5 s later.
    let due = tdb
        .db
        .query_one_raw(Statement::from_string(
            tdb.db.get_database_backend(),
            "SELECT count(*) AS n FROM saga_timers WHERE timer_kind = 'payment_due'",
        ))
        .await
        .expect("count")
        .expect("row");
    assert_eq!(due.try_get::<i64>("", "n").expect("n"), 20);
    tdb.drop().await;
}

#[tokio::test]
async fn a_failing_message_rolls_its_batch_back_and_the_batch_changes_nothing() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let clock = ManualClock::new(t0());
    let engine = engine(&tdb.db, &clock, true);
    let (order, created) = place_order(&tdb.db, t0()).await;
    let mut unknown = created.clone();
    unknown.message_id = uuid::Uuid::new_v4();
    unknown.correlation_id = "999999".to_owned();
    let span = tracing::Span::none();
    let batch = [
        Incoming {
            envelope: &created,
            span: &span,
        },
        Incoming {
            envelope: &unknown,
            span: &span,
        },
    ];
    let error = engine
        .handle_batch(ORDER_SAGA_CONSUMER, &batch)
        .await
        .expect_err("an unknown instance fails the batch");
    assert!(error.to_string().contains("999999"), "{error}");
    // Nothing of the batch stayed: not even the good message's inbox row,
    // so it is handled when taken alone.
    assert_eq!(order_status(&tdb.db, order.order_id).await, "pending");
    let alone = engine
        .handle(ORDER_SAGA_CONSUMER, &created)
        .await
        .expect("alone");
    assert!(matches!(alone, Handled::Applied { .. }), "{alone:?}");
    tdb.drop().await;
}

#[tokio::test]
async fn a_poison_message_in_the_middle_of_a_consumed_batch_is_dead_lettered_alone() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let broker = TestBroker::create(topology::queues).await;
    let transport = connect(&broker).await;
    let clock = ManualClock::new(t0());
    let engine = engine(&tdb.db, &clock, true);
    let queue = topology::saga_queue(&broker.prefix);
    let mut orders = Vec::new();
    let mut messages = Vec::new();
    for n in 0..9 {
        let (order, created) = place_order(&tdb.db, t0()).await;
        orders.push(order.order_id);
        messages.push(created.clone());
        if n == 4 {
            // An OrderCreated for an order that does not exist.
            let mut poison = created;
            poison.message_id = uuid::Uuid::new_v4();
            poison.correlation_id = "424242".to_owned();
            messages.push(poison);
        }
    }
    // All ten queued before the consumer starts, so they come as one batch.
    let outgoing: Vec<saga::transport::OutgoingMessage> = messages
        .iter()
        .map(|e| saga::transport::OutgoingMessage {
            message_id: e.message_id,
            message_type: e.message_type.clone(),
            correlation_id: e.correlation_id.clone(),
            routing_key: "order.created".to_owned(),
            body: serde_json::to_vec(e).expect("body"),
            trace: None,
        })
        .collect();
    for result in transport.publish(&outgoing).await.expect("publish") {
        result.expect("confirmed");
    }
    let consumer = saga_consumer(transport.clone(), &broker.prefix, &engine).with_batch_size(16);
    let subscription = transport
        .subscribe(&queue, ORDER_SAGA_CONSUMER, 16)
        .await
        .expect("subscribe");
    use futures_util::StreamExt;
    let deliveries: Vec<_> = tokio::time::timeout(
        StdDuration::from_secs(10),
        subscription
            .take(10)
            .map(|d| d.expect("delivery"))
            .collect::<Vec<_>>(),
    )
    .await
    .expect("ten deliveries within 10 s");
    let shutdown = tokio_util::sync::CancellationToken::new();
    consumer.process_batch(deliveries, &shutdown).await;
    for order in &orders {
        assert_eq!(
            order_status(&tdb.db, *order).await,
            "processing",
            "order {order}"
        );
    }
    let letters = broker
        .transport
        .dead_letters(&queue, 10)
        .await
        .expect("dead letters");
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(
        letters[0].message_id.as_deref(),
        Some(messages[5].message_id.to_string().as_str())
    );
    assert!(
        letters[0]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("424242")),
        "{letters:?}"
    );
    broker.delete().await;
    tdb.drop().await;
}

#[tokio::test]
async fn due_timers_fire_in_one_transaction_and_a_failing_one_does_not_hold_the_others() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let clock = ManualClock::new(t0());
    let engine = engine(&tdb.db, &clock, true);
    let mut orders = Vec::new();
    for _ in 0..12 {
        let (order, created) = place_order(&tdb.db, t0()).await;
        engine
            .handle(ORDER_SAGA_CONSUMER, &created)
            .await
            .expect("handled");
        orders.push(order.order_id);
    }
    clock.advance(Duration::seconds(5));
    let fired = engine.fire_due_timers(100).await.expect("fire");
    assert_eq!(fired.len(), 12);
    assert!(
        fired
            .iter()
            .all(|f| matches!(f.input, OrderInput::PaymentDecided { approved: true, .. }))
    );
    for order in &orders {
        assert_eq!(order_status(&tdb.db, *order).await, "completed");
    }
    assert_eq!(
        transactions(
            &tdb.db,
            "SELECT xmin FROM saga_transitions WHERE trigger = 'PaymentDecided'"
        )
        .await,
        1
    );
    assert_eq!(
        transactions(&tdb.db, "SELECT xmin FROM saga_timers").await,
        1,
        "marked fired in the same transaction"
    );
    assert!(engine.fire_due_timers(100).await.expect("fire").is_empty());

    // A timer whose payload this saga cannot read, due first: the batch
    // falls back to one at a time; the bad one spends its instance's budget
    // and the good ones fire.
    let mut more = Vec::new();
    for _ in 0..3 {
        let (order, created) = place_order(&tdb.db, clock_now(&clock)).await;
        engine
            .handle(ORDER_SAGA_CONSUMER, &created)
            .await
            .expect("handled");
        more.push(order.order_id);
    }
    tdb.db
        .execute_unprepared(&format!(
            "UPDATE saga_timers SET payload = '{{\"unknown\": 1}}', due_at = due_at - interval '1 second' \
             WHERE correlation_id = '{}'",
            more[0]
        ))
        .await
        .expect("spoil a timer");
    clock.advance(Duration::seconds(5));
    let fired = engine.fire_due_timers(100).await.expect("fire");
    assert_eq!(fired.len(), 2, "{fired:?}");
    assert_eq!(order_status(&tdb.db, more[0]).await, "processing");
    assert_eq!(order_status(&tdb.db, more[1]).await, "completed");
    assert_eq!(order_status(&tdb.db, more[2]).await, "completed");
    let journal = journal_of(&tdb.db, more[0]).await;
    let last = journal.last().expect("journal");
    assert_eq!(
        last.outcome, "parked",
        "corrupt data is not retried: {last:?}"
    );

    // Parked, its timer is left alone: not claimed, not the next one due,
    // however long it waits.
    clock.advance(Duration::seconds(3600));
    assert!(engine.fire_due_timers(100).await.expect("fire").is_empty());
    assert_eq!(engine.next_timer_due().await.expect("next"), None);

    // Mended (a timer without a payload carries its kind) and resumed by an
    // operator: it fires.
    tdb.db
        .execute_unprepared(&format!(
            "UPDATE saga_timers SET payload = NULL WHERE correlation_id = '{}'",
            more[0]
        ))
        .await
        .expect("mend the timer");
    engine.resume(&more[0].to_string()).await.expect("resume");
    assert_eq!(
        engine.next_timer_due().await.expect("next"),
        Some(clock_now(&clock))
    );
    let fired = engine.fire_due_timers(100).await.expect("fire");
    assert_eq!(fired.len(), 1, "{fired:?}");
    assert_eq!(order_status(&tdb.db, more[0]).await, "completed");
    tdb.drop().await;
}

fn clock_now(clock: &ManualClock) -> chrono::DateTime<chrono::Utc> {
    saga::clock::Clock::now(clock)
}

/// The first two products and their stock.
async fn two_products(db: &DatabaseConnection) -> (i64, i64, i32, i32) {
    let all = products::Entity::find().all(db).await.expect("products");
    let (a, b) = (all[0].id, all[1].id);
    (a, b, stock(db, a).await, stock(db, b).await)
}

/// Places `count` orders of one unit of `product_of(n)` each and hands
/// their `OrderCreated` to `engine` (they go `processing`). Returns the
/// order ids.
async fn processing_orders(
    engine: &SagaEngine<OrderSaga>,
    db: &DatabaseConnection,
    count: usize,
    product_of: impl Fn(usize) -> i64,
) -> Vec<i64> {
    let mut orders = Vec::with_capacity(count);
    for n in 0..count {
        let (order, created) = place_order_of(db, t0(), product_of(n), 1).await;
        engine
            .handle(ORDER_SAGA_CONSUMER, &created)
            .await
            .expect("handled");
        orders.push(order.order_id);
    }
    orders
}

#[tokio::test]
async fn a_sweep_expires_a_batch_set_based_and_gives_each_product_its_stock_back_once() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let clock = ManualClock::new(t0());
    let engine = engine(&tdb.db, &clock, false);
    let (a, b, stock_a, stock_b) = two_products(&tdb.db).await;
    let orders = processing_orders(&engine, &tdb.db, 30, |n| if n % 3 == 0 { b } else { a }).await;
    assert_eq!(stock(&tdb.db, a).await, stock_a - 20);
    assert_eq!(stock(&tdb.db, b).await, stock_b - 10);
    clock.advance(Duration::seconds(601));
    let swept = engine.sweep_all().await.expect("sweep");
    assert_eq!(swept.timed_out, 30);
    for order in &orders {
        assert_eq!(order_status(&tdb.db, *order).await, "expired");
        assert_eq!(outbox_count(&tdb.db, *order, "OrderExpired").await, 1);
    }
    assert_eq!(stock(&tdb.db, a).await, stock_a);
    assert_eq!(stock(&tdb.db, b).await, stock_b);
    assert_eq!(
        transactions(
            &tdb.db,
            "SELECT xmin FROM saga_transitions WHERE trigger = 'ExpirationDue'"
        )
        .await,
        1
    );
    assert_eq!(engine.sweep_all().await.expect("again").timed_out, 0);
    tdb.drop().await;
}

#[tokio::test]
async fn sweep_workers_in_parallel_expire_each_order_once_and_give_the_stock_back_once() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let clock = ManualClock::new(t0());
    let engine = engine(&tdb.db, &clock, false).with_settings(EngineSettings {
        sweep_batch_size: 20,
        sweep_workers: 3,
        ..EngineSettings::default()
    });
    let (a, b, stock_a, stock_b) = two_products(&tdb.db).await;
    // Every batch gives stock back to both products: the workers contend
    // for the same rows.
    let orders = processing_orders(&engine, &tdb.db, 130, |n| if n % 2 == 0 { b } else { a }).await;
    assert_eq!(stock(&tdb.db, a).await, stock_a - 65);
    assert_eq!(stock(&tdb.db, b).await, stock_b - 65);
    clock.advance(Duration::seconds(601));
    let batches = std::sync::atomic::AtomicUsize::new(0);
    let swept = engine
        .sweep_all_with(|_| {
            batches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        })
        .await
        .expect("sweep");
    assert_eq!(swept.timed_out, 130);
    // 7 full or partial batches of 20, plus each worker's last, empty look.
    assert!(
        batches.load(std::sync::atomic::Ordering::Relaxed) >= 7,
        "{batches:?}"
    );
    for order in &orders {
        assert_eq!(order_status(&tdb.db, *order).await, "expired");
        assert_eq!(outbox_count(&tdb.db, *order, "OrderExpired").await, 1);
    }
    assert_eq!(stock(&tdb.db, a).await, stock_a);
    assert_eq!(stock(&tdb.db, b).await, stock_b);
    assert!(
        transactions(
            &tdb.db,
            "SELECT xmin FROM saga_transitions WHERE trigger = 'ExpirationDue'"
        )
        .await
            >= 7
    );
    assert_eq!(engine.sweep_all().await.expect("again").timed_out, 0);
    tdb.drop().await;
}

#[tokio::test]
async fn events_are_handed_to_the_relay_after_the_commit_and_a_dead_writers_lease_runs_out() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let broker = TestBroker::create(topology::queues).await;
    let transport = connect(&broker).await;
    let clock = ManualClock::new(t0());
    let settings = RelaySettings {
        lease: Duration::seconds(5),
        ..RelaySettings::default()
    };
    // A writer and its relay share a handle: the writer's events are leased
    // to that relay, which gets them without claiming.
    let handle = OutboxHandle::new(settings.lease);
    let writer = engine(&tdb.db, &clock, true).with_outbox(handle.clone());
    let (_, created) = place_order(&tdb.db, t0()).await;
    let relay = OutboxRelay::new(
        tdb.db.clone(),
        transport.clone(),
        Arc::new(clock.clone()),
        settings.clone(),
        handle.clone(),
    );
    // The OrderCreated placed without the handle is nobody's: claimable now.
    let claimed = relay.try_relay_once().await.expect("relay");
    assert_eq!(claimed.published, 1);
    writer
        .handle(ORDER_SAGA_CONSUMER, &created)
        .await
        .expect("handled");
    clock.advance(Duration::seconds(5));
    writer.fire_due_timers(10).await.expect("fire");
    assert_eq!(handle.waiting(), 1, "OrderCompleted handed to the relay");
    let direct = relay.try_relay_once().await.expect("relay");
    assert_eq!(direct.published, 1);
    assert_eq!(handle.waiting(), 0);

    // A writer that dies before its relay publishes: its events are leased
    // to nobody alive; another relay publishes them once the lease ran out.
    let dead = OutboxHandle::new(settings.lease);
    let doomed = engine(&tdb.db, &clock, true).with_outbox(dead.clone());
    let (order, created) = place_order(&tdb.db, clock_now(&clock)).await;
    relay.try_relay_once().await.expect("its OrderCreated");
    doomed
        .handle(ORDER_SAGA_CONSUMER, &created)
        .await
        .expect("handled");
    clock.advance(Duration::seconds(5));
    doomed.fire_due_timers(10).await.expect("fire");
    assert_eq!(
        outbox_count(&tdb.db, order.order_id, "OrderCompleted").await,
        1
    );
    let other = OutboxRelay::new(
        tdb.db.clone(),
        transport.clone(),
        Arc::new(clock.clone()),
        settings.clone(),
        OutboxHandle::new(settings.lease),
    );
    assert_eq!(
        other.try_relay_once().await.expect("relay").claimed,
        0,
        "still leased"
    );
    clock.advance(Duration::seconds(5));
    assert_eq!(
        other.try_relay_once().await.expect("relay").published,
        1,
        "lease expired"
    );
    broker.delete().await;
    tdb.drop().await;
}

#[tokio::test]
async fn two_inputs_for_one_instance_in_one_batch_are_decided_in_order() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let clock = ManualClock::new(t0());
    let engine = engine(&tdb.db, &clock, true);
    let (order, created) = place_order(&tdb.db, t0()).await;
    let mut again = created.clone();
    again.message_id = uuid::Uuid::new_v4();
    let span = tracing::Span::none();
    let handled = engine
        .handle_batch(
            ORDER_SAGA_CONSUMER,
            &[
                Incoming {
                    envelope: &created,
                    span: &span,
                },
                Incoming {
                    envelope: &again,
                    span: &span,
                },
            ],
        )
        .await
        .expect("batch");
    assert!(matches!(handled[0], Handled::Applied { .. }), "{handled:?}");
    assert!(
        matches!(
            handled[1],
            Handled::Ignored {
                state: OrderState::Processing,
                ..
            }
        ),
        "{handled:?}"
    );
    let instance = engine
        .instance(&order.order_id.to_string())
        .await
        .expect("instance")
        .expect("exists");
    assert_eq!(instance.version, 1, "one applied input");
    tdb.drop().await;
}
