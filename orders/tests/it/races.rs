//! Forced races and the stock compensation, against the real PostgreSQL.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration as StdDuration;

use ::orders::contracts::OrderLine;
use ::orders::notifications::NotificationHandler;
use ::orders::topology::{self, NOTIFICATIONS_CONSUMER};
use ::orders::{Customer, Item, OrderError, OrderInput, OrderSaga, OrderState};
use async_trait::async_trait;
use chrono::Duration;
use entity::{orders, products};
use saga::SagaError;
use saga::clock::{ManualClock, SystemClock};
use saga::consumer::Consumer;
use saga::consumer::RetryPolicy;
use saga::definition::SagaState as _;
use saga::engine::{ApplyProbe, Handled};
use saga::schema::instances as saga_instances;
use saga::testing::{TestBroker, TestDatabase, eventually};
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder,
    TransactionTrait,
};
use tokio::sync::Barrier;
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

/// Holds the first payment decision and the first expiry at a barrier, so
/// both have loaded the same version before either writes.
struct Collide {
    barrier: Barrier,
    arrived: AtomicUsize,
}

#[async_trait]
impl ApplyProbe<OrderSaga> for Collide {
    async fn before_write(
        &self,
        _instance: &saga_instances::Model,
        input: &OrderInput,
    ) -> Result<(), SagaError> {
        if matches!(
            input,
            OrderInput::PaymentDecided { .. } | OrderInput::ExpirationDue
        ) && self.arrived.fetch_add(1, Ordering::SeqCst) < 2
        {
            self.barrier.wait().await;
        }
        Ok(())
    }
}

#[tokio::test]
async fn expiry_and_payment_success_forced_to_collide_end_in_one_terminal_state() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let broker = TestBroker::create(topology::queues).await;
    let clock = ManualClock::new(t0());
    let collide = Arc::new(Collide {
        barrier: Barrier::new(2),
        arrived: AtomicUsize::new(0),
    });
    let engine = engine(&tdb.db, &clock, true).with_probe(collide.clone());
    let (order, created) = place_order(&tdb.db, t0()).await;
    engine
        .handle("order-saga", &created)
        .await
        .expect("processing");
    // Both the payment timer (+5 s) and the expiry (+600 s) are due now.
    clock.advance(Duration::seconds(601));

    let (fired, swept) = tokio::join!(engine.try_fire_due_timer_once(), engine.try_sweep_once());
    let fired = fired.expect("timer").expect("a due timer");
    let swept = swept.expect("sweep");
    assert_eq!(
        collide.arrived.load(Ordering::SeqCst),
        2,
        "both sides collided"
    );
    // The sweep holds the row lock, so it wins; the payment reloads, sees
    // `expired` and is ignored.
    assert_eq!(swept.timed_out, 1);
    assert!(
        matches!(
            fired.handled,
            Handled::Ignored {
                state: OrderState::Expired,
                ..
            }
        ),
        "{fired:?}"
    );
    assert_eq!(order_status(&tdb.db, order.order_id).await, "expired");
    let completed = outbox_count(&tdb.db, order.order_id, "OrderCompleted").await;
    let expired = outbox_count(&tdb.db, order.order_id, "OrderExpired").await;
    assert_eq!((completed, expired), (0, 1), "exactly one terminal event");
    let journal = journal_of(&tdb.db, order.order_id).await;
    let terminal: Vec<_> = journal
        .iter()
        .filter(|j| {
            j.outcome == "applied" && (j.to_state == "expired" || j.to_state == "completed")
        })
        .collect();
    assert_eq!(terminal.len(), 1);

    // Publish everything and let the notification consumer run: exactly one
    // terminal notification.
    let transport = connect(&broker).await;
    let relay = relay(
        &tdb.db,
        transport.clone(),
        saga::outbox::OutboxHandle::default(),
    );
    assert_eq!(relay.try_relay_once().await.expect("relay").published, 2);
    let consumer = Consumer::new(
        transport.clone(),
        topology::notifications_queue(&broker.prefix),
        NOTIFICATIONS_CONSUMER,
        Arc::new(NotificationHandler::new(
            tdb.db.clone(),
            Arc::new(SystemClock),
            NOTIFICATIONS_CONSUMER,
        )),
        RetryPolicy::default(),
        4,
    );
    let stop = CancellationToken::new();
    let running = {
        let stop = stop.clone();
        tokio::spawn(async move { consumer.run_until_stopped(stop).await })
    };
    let kinds = eventually(StdDuration::from_secs(10), "two notifications", || async {
        let n = notifications_of(&tdb.db, order.order_id).await;
        // The consumer handles messages concurrently: compare as a set.
        (n.len() >= 2).then(|| {
            let mut kinds: Vec<_> = n.into_iter().map(|n| n.event_type).collect();
            kinds.sort();
            kinds
        })
    })
    .await;
    assert_eq!(
        kinds,
        vec!["OrderCreated".to_owned(), "OrderExpired".to_owned()],
        "one OrderCreated and one OrderExpired notification, no OrderCompleted"
    );
    stop.cancel();
    running.await.expect("join").expect("stopped");
    transport.close().await;
    broker.delete().await;
    tdb.drop().await;
}

async fn first_product(tdb: &TestDatabase) -> products::Model {
    products::Entity::find()
        .order_by_asc(products::Column::Id)
        .one(&tdb.db)
        .await
        .expect("query")
        .expect("seeded product")
}

async fn stock_of(tdb: &TestDatabase, id: i64) -> i32 {
    products::Entity::find_by_id(id)
        .one(&tdb.db)
        .await
        .expect("query")
        .expect("product")
        .stock
}

#[tokio::test]
async fn stock_is_reserved_when_placed_and_released_exactly_once_when_expired() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let clock = ManualClock::new(t0());
    let engine = engine(&tdb.db, &clock, false);
    let product = first_product(&tdb).await;
    let before = product.stock;
    // helpers::place_order orders 2 of the first product.
    let (order, created) = place_order(&tdb.db, t0()).await;
    assert_eq!(stock_of(&tdb, product.id).await, before - 2, "reserved");
    engine
        .handle("order-saga", &created)
        .await
        .expect("processing");
    clock.advance(Duration::seconds(5));
    engine.try_fire_due_timer_once().await.expect("declined");
    assert_eq!(
        stock_of(&tdb, product.id).await,
        before - 2,
        "still reserved"
    );
    clock.advance(Duration::seconds(600));
    // Two schedulers at once, then another sweep: one release in all.
    let (a, b) = tokio::join!(engine.try_sweep_once(), engine.try_sweep_once());
    assert_eq!(a.expect("a").timed_out + b.expect("b").timed_out, 1);
    engine.sweep_all().await.expect("again");
    assert_eq!(order_status(&tdb.db, order.order_id).await, "expired");
    assert_eq!(stock_of(&tdb, product.id).await, before, "released once");
    tdb.drop().await;
}

#[tokio::test]
async fn an_order_larger_than_the_stock_is_refused_and_writes_nothing() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let product = first_product(&tdb).await;
    let orders_before = orders::Entity::find().count(&tdb.db).await.expect("count");
    let txn = tdb.db.begin().await.expect("begin");
    let clock = ManualClock::new(t0());
    let result = ::orders::place_order(
        &engine(&tdb.db, &clock, true),
        &txn,
        &Customer {
            user_id: 1,
            email: "admin@example.com".into(),
            name: "A".into(),
        },
        vec![OrderLine {
            product_id: product.id,
            product_name: product.name.clone(),
            quantity: product.stock + 1,
            unit_price: product.price,
        }],
    )
    .await;
    match result {
        Err(OrderError::OutOfStock {
            product_id,
            requested,
            available,
        }) => {
            assert_eq!(product_id, product.id);
            assert_eq!(requested, product.stock + 1);
            assert_eq!(available, product.stock);
        }
        other => panic!("expected OutOfStock, got {other:?}"),
    }
    txn.rollback().await.expect("rollback");
    assert_eq!(stock_of(&tdb, product.id).await, product.stock);
    assert_eq!(
        orders::Entity::find().count(&tdb.db).await.expect("count"),
        orders_before
    );
    tdb.drop().await;
}

#[tokio::test]
async fn placing_items_takes_names_and_prices_from_the_reservation_and_refuses_what_it_cannot_place()
 {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let clock = ManualClock::new(t0());
    let engine = engine(&tdb.db, &clock, true);
    let customer = new_customer(&tdb.db, t0()).await;
    let catalogue = products::Entity::find()
        .order_by_asc(products::Column::Id)
        .all(&tdb.db)
        .await
        .expect("products");
    let (first, second) = (&catalogue[0], &catalogue[1]);
    let stocks = (first.stock, second.stock);
    let max = rust_decimal::Decimal::new(999_999_999_999, 2);

    // Items in descending id order come back in the items' order, priced
    // and named from the catalogue.
    let txn = tdb.db.begin().await.expect("begin");
    let items = [
        Item {
            product_id: second.id,
            quantity: 2,
        },
        Item {
            product_id: first.id,
            quantity: 1,
        },
    ];
    let placed = ::orders::place_items(&engine, &txn, &customer, &items, max)
        .await
        .expect("placed");
    txn.commit().await.expect("commit");
    let lines: Vec<(i64, String, i32, rust_decimal::Decimal)> = placed
        .snapshot
        .items
        .iter()
        .map(|l| {
            (
                l.product_id,
                l.product_name.clone(),
                l.quantity,
                l.unit_price,
            )
        })
        .collect();
    assert_eq!(
        lines,
        vec![
            (second.id, second.name.clone(), 2, second.price),
            (first.id, first.name.clone(), 1, first.price),
        ]
    );
    assert_eq!(
        placed.order.total,
        second.price * rust_decimal::Decimal::from(2) + first.price
    );
    assert_eq!(stock_of(&tdb, first.id).await, stocks.0 - 1);
    assert_eq!(stock_of(&tdb, second.id).await, stocks.1 - 2);
    let orders_before = orders::Entity::find().count(&tdb.db).await.expect("count");

    // A product that does not exist, after one that does: nothing is kept.
    let txn = tdb.db.begin().await.expect("begin");
    let unknown = [
        Item {
            product_id: first.id,
            quantity: 1,
        },
        Item {
            product_id: 999_999,
            quantity: 1,
        },
    ];
    match ::orders::place_items(&engine, &txn, &customer, &unknown, max).await {
        Err(OrderError::UnknownProduct { product_id }) => assert_eq!(product_id, 999_999),
        other => panic!("expected UnknownProduct, got {other:?}"),
    }
    txn.rollback().await.expect("rollback");

    // A total above the limit.
    let txn = tdb.db.begin().await.expect("begin");
    let one = [Item {
        product_id: first.id,
        quantity: 1,
    }];
    let below_price = first.price - rust_decimal::Decimal::new(1, 2);
    match ::orders::place_items(&engine, &txn, &customer, &one, below_price).await {
        Err(OrderError::TotalTooLarge { total, max }) => {
            assert_eq!((total, max), (first.price, below_price));
        }
        other => panic!("expected TotalTooLarge, got {other:?}"),
    }
    txn.rollback().await.expect("rollback");

    // More than the stock.
    let txn = tdb.db.begin().await.expect("begin");
    let too_many = [Item {
        product_id: second.id,
        quantity: stocks.1,
    }];
    match ::orders::place_items(&engine, &txn, &customer, &too_many, max).await {
        Err(OrderError::OutOfStock {
            product_id,
            requested,
            available,
        }) => assert_eq!(
            (product_id, requested, available),
            (second.id, stocks.1, stocks.1 - 2)
        ),
        other => panic!("expected OutOfStock, got {other:?}"),
    }
    txn.rollback().await.expect("rollback");

    assert_eq!(stock_of(&tdb, first.id).await, stocks.0 - 1);
    assert_eq!(stock_of(&tdb, second.id).await, stocks.1 - 2);
    assert_eq!(
        orders::Entity::find().count(&tdb.db).await.expect("count"),
        orders_before
    );
    tdb.drop().await;
}

#[tokio::test]
async fn placing_many_orders_writes_each_with_its_own_saga_and_refuses_all_when_one_cannot_be_placed()
 {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let clock = ManualClock::new(t0());
    let engine = engine(&tdb.db, &clock, true);
    let alice = new_customer(&tdb.db, t0()).await;
    let bob = new_customer(&tdb.db, t0()).await;
    let catalogue = products::Entity::find()
        .order_by_asc(products::Column::Id)
        .all(&tdb.db)
        .await
        .expect("products");
    let (first, second) = (&catalogue[0], &catalogue[1]);
    let stocks = (first.stock, second.stock);
    let max = rust_decimal::Decimal::new(999_999_999_999, 2);
    let item = |product: &products::Model, quantity| Item {
        product_id: product.id,
        quantity,
    };
    let span = tracing::Span::none;

    // Three orders, two sharing a product: each gets its own order, items,
    // saga instance, journal row and OrderCreated, in the given order.
    let batch = vec![
        (alice.clone(), vec![item(second, 2), item(first, 1)], span()),
        (bob.clone(), vec![item(first, 3)], span()),
        (alice.clone(), vec![item(second, 1)], span()),
    ];
    let txn = tdb.db.begin().await.expect("begin");
    let placed = ::orders::place_many(&engine, &txn, &batch, max)
        .await
        .expect("placed");
    txn.commit().await.expect("commit");
    assert_eq!(placed.len(), 3);
    assert!(placed[0].order.id < placed[1].order.id && placed[1].order.id < placed[2].order.id);
    let users: Vec<i64> = placed.iter().map(|p| p.order.user_id).collect();
    assert_eq!(users, vec![alice.user_id, bob.user_id, alice.user_id]);
    let lines: Vec<Vec<(i64, i32)>> = placed
        .iter()
        .map(|p| {
            p.snapshot
                .items
                .iter()
                .map(|l| (l.product_id, l.quantity))
                .collect()
        })
        .collect();
    assert_eq!(
        lines,
        vec![
            vec![(second.id, 2), (first.id, 1)],
            vec![(first.id, 3)],
            vec![(second.id, 1)],
        ]
    );
    assert_eq!(
        placed[1].order.total,
        first.price * rust_decimal::Decimal::from(3)
    );
    assert_eq!(stock_of(&tdb, first.id).await, stocks.0 - 4);
    assert_eq!(stock_of(&tdb, second.id).await, stocks.1 - 3);
    for p in &placed {
        let stored = orders::Entity::find_by_id(p.order.id)
            .one(&tdb.db)
            .await
            .expect("query")
            .expect("order row");
        assert_eq!(stored, p.order, "the returned row is the stored one");
        let instance = saga_instances::Entity::find()
            .filter(saga_instances::Column::CorrelationId.eq(p.order.id.to_string()))
            .one(&tdb.db)
            .await
            .expect("query")
            .expect("instance");
        assert_eq!(instance.state, OrderState::Pending.name());
        let snapshot: ::orders::contracts::OrderSnapshot =
            serde_json::from_value(instance.data).expect("snapshot");
        assert_eq!(snapshot, p.snapshot);
        let journal = journal_of(&tdb.db, p.order.id).await;
        assert_eq!(journal.len(), 1);
        assert_eq!(
            journal[0].saga_instance_id, instance.id,
            "journal row of its own instance"
        );
        assert_eq!(journal[0].message_id, Some(p.message_id));
        assert_eq!(outbox_count(&tdb.db, p.order.id, "OrderCreated").await, 1);
        assert_eq!(p.events.len(), 1);
        assert_eq!(p.events[0].message_id, p.message_id);
        assert_eq!(p.events[0].correlation_id, p.order.id.to_string());
    }

    // Together more than the stock of one product (each alone would fit):
    // nothing is placed.
    let orders_before = orders::Entity::find().count(&tdb.db).await.expect("count");
    let left = stock_of(&tdb, second.id).await;
    let batch = vec![
        (alice.clone(), vec![item(first, 1)], span()),
        (bob.clone(), vec![item(second, left)], span()),
        (alice.clone(), vec![item(second, 1)], span()),
    ];
    let txn = tdb.db.begin().await.expect("begin");
    match ::orders::place_many(&engine, &txn, &batch, max).await {
        Err(OrderError::OutOfStock { product_id, .. }) => assert_eq!(product_id, second.id),
        other => panic!("expected OutOfStock, got {other:?}"),
    }
    txn.rollback().await.expect("rollback");
    // A total above the limit in one of them: nothing is placed.
    let txn = tdb.db.begin().await.expect("begin");
    let batch = vec![
        (alice.clone(), vec![item(first, 1)], span()),
        (bob.clone(), vec![item(first, 2)], span()),
    ];
    match ::orders::place_many(&engine, &txn, &batch, first.price).await {
        Err(OrderError::TotalTooLarge { total, .. }) => {
            assert_eq!(total, first.price * rust_decimal::Decimal::from(2));
        }
        other => panic!("expected TotalTooLarge, got {other:?}"),
    }
    txn.rollback().await.expect("rollback");
    assert_eq!(
        orders::Entity::find().count(&tdb.db).await.expect("count"),
        orders_before
    );
    assert_eq!(stock_of(&tdb, first.id).await, stocks.0 - 4);
    assert_eq!(stock_of(&tdb, second.id).await, left);
    tdb.drop().await;
}

#[tokio::test]
async fn a_sweep_releasing_stock_does_not_deadlock_with_an_order_reserving_it() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let clock = ManualClock::new(t0());
    let engine = engine(&tdb.db, &clock, false);
    // Order A (product 3) went stale first, order B (product 2) later: the
    // sweep expires A before B.
    let (a, created_a) = place_order_of(&tdb.db, t0(), 3, 1).await;
    engine.handle("order-saga", &created_a).await.expect("A");
    clock.advance(Duration::seconds(1));
    let (b, created_b) = place_order_of(&tdb.db, t0(), 2, 1).await;
    engine.handle("order-saga", &created_b).await.expect("B");
    clock.advance(Duration::seconds(700));
    let (stock2, stock3) = (stock_of(&tdb, 2).await, stock_of(&tdb, 3).await);

    // A customer's transaction reserves product 2, then (below) product 3,
    // in id order as placing an order does.
    let customer = tdb.db.begin().await.expect("begin");
    customer
        .execute_unprepared("UPDATE products SET stock = stock - 1 WHERE id = 2")
        .await
        .expect("reserve 2");
    let sweep = {
        let engine = engine.clone();
        tokio::spawn(async move { engine.try_sweep_once().await })
    };
    // Wait until the sweep is blocked on a row lock the customer holds.
    eventually(
        StdDuration::from_secs(10),
        "the sweep waiting for a lock",
        || async {
            let waiting = tdb
                .db
                .query_one_raw(sea_orm::Statement::from_string(
                    sea_orm::DbBackend::Postgres,
                    "SELECT count(*) AS n FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
                ))
                .await
                .ok()??
                .try_get::<i64>("", "n")
                .ok()?;
            (waiting > 0).then_some(())
        },
    )
    .await;
    // Had the sweep locked product 3 first (releasing A's stock), this would
    // deadlock and PostgreSQL would abort one of the two.
    customer
        .execute_unprepared("UPDATE products SET stock = stock - 1 WHERE id = 3")
        .await
        .expect("reserve 3 without a deadlock");
    customer.commit().await.expect("commit");
    let swept = sweep
        .await
        .expect("join")
        .expect("sweep without a deadlock");
    assert_eq!(swept.timed_out, 2);
    assert_eq!(order_status(&tdb.db, a.order_id).await, "expired");
    assert_eq!(order_status(&tdb.db, b.order_id).await, "expired");
    // Each order gave its unit back; the customer took one of each.
    assert_eq!(stock_of(&tdb, 2).await, stock2 + 1 - 1);
    assert_eq!(stock_of(&tdb, 3).await, stock3 + 1 - 1);
    tdb.drop().await;
}
