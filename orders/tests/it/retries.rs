//! Retries with a persisted budget, parking, resume and re-driving, against
//! the real PostgreSQL and RabbitMQ.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::types::ShortString;
use orders::OrderSaga;
use orders::topology;
use orders::{OrderInput, OrderState};
use saga::SagaError;
use saga::clock::ManualClock;
use saga::consumer::{ConsumeOutcome, Consumer};
use saga::engine::{ApplyProbe, Handled};
use saga::message::Envelope;
use saga::outbox::{OutboxRelay, RelaySettings};
use saga::schema::instances as saga_instances;
use saga::schema::timers as saga_timers;
use saga::testing::{TestBroker, TestDatabase, eventually};
use saga::transport::Transport;
use saga::transport::rabbitmq::RabbitTransport;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, PaginatorTrait, QueryFilter,
};
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

/// Fails every write while `failing` is set, and remembers the instance
/// version each attempt saw.
#[derive(Default)]
struct FlakyEffect {
    failing: AtomicBool,
    calls: AtomicUsize,
    versions: Mutex<Vec<i32>>,
    /// Cancelled on the first call (simulates a runner stopping mid-retry).
    stop_after_first: Option<CancellationToken>,
}

#[async_trait]
impl ApplyProbe<OrderSaga> for FlakyEffect {
    async fn before_write(
        &self,
        instance: &saga_instances::Model,
        _input: &OrderInput,
    ) -> Result<(), SagaError> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if let Ok(mut v) = self.versions.lock() {
            v.push(instance.version);
        }
        if call == 1
            && let Some(token) = &self.stop_after_first
        {
            token.cancel();
        }
        if self.failing.load(Ordering::SeqCst) {
            return Err(SagaError::Db(sea_orm::DbErr::Custom(
                "injected failure in an effect".to_owned(),
            )));
        }
        Ok(())
    }
}

/// Places an order and relays its `OrderCreated` to the broker.
async fn order_on_the_queue(db: &DatabaseConnection, transport: &Arc<RabbitTransport>) -> i64 {
    let (snapshot, _) = place_order(db, t0()).await;
    let relay = OutboxRelay::new(
        db.clone(),
        transport.clone(),
        Arc::new(ManualClock::new(t0())),
        RelaySettings::default(),
        saga::outbox::OutboxHandle::default(),
    );
    let outcome = relay.try_relay_once().await.expect("relay");
    assert_eq!(outcome.published, 1, "OrderCreated published");
    snapshot.order_id
}

async fn instance(db: &DatabaseConnection, order_id: i64) -> saga_instances::Model {
    saga_instances::Entity::find()
        .filter(saga_instances::Column::CorrelationId.eq(order_id.to_string()))
        .one(db)
        .await
        .expect("instance query")
        .expect("instance")
}

#[tokio::test]
async fn the_retry_budget_is_persisted_shared_across_runners_and_parks_when_spent() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let broker = TestBroker::create(orders::topology::queues).await;
    let clock = ManualClock::new(t0());
    let transport = connect(&broker).await;
    let order_id = order_on_the_queue(&tdb.db, &transport).await;
    let queue = topology::saga_queue(&broker.prefix);

    // Runner 1 fails once and is stopped during its backoff: the message goes
    // back to the queue, the spent attempt stays in the database.
    let stopping = CancellationToken::new();
    let flaky = Arc::new(FlakyEffect {
        failing: AtomicBool::new(true),
        stop_after_first: Some(stopping.clone()),
        ..FlakyEffect::default()
    });
    let engine = engine(&tdb.db, &clock, true).with_probe(flaky.clone());
    let runner1 = saga_consumer(transport.clone(), &broker.prefix, &engine);
    let mut stream = transport
        .subscribe(&queue, "runner-1", 1)
        .await
        .expect("subscribe");
    let delivery = stream.next().await.expect("a delivery").expect("ok");
    let outcome = runner1
        .process_until(delivery, &stopping)
        .await
        .expect("settled");
    assert_eq!(outcome, ConsumeOutcome::HandedBack);
    drop(stream);
    assert_eq!(instance(&tdb.db, order_id).await.attempts, 1);

    // Runner 2 (another process) gets the redelivery and spends the rest of
    // the same budget: 2 more attempts, not 3.
    let transport2 = connect(&broker).await;
    let runner2 = saga_consumer(transport2.clone(), &broker.prefix, &engine);
    let stop2 = CancellationToken::new();
    let running = {
        let stop2 = stop2.clone();
        tokio::spawn(async move { runner2.run_until_stopped(stop2).await })
    };
    let letters = eventually(Duration::from_secs(10), "a dead letter", || async {
        let letters = broker
            .transport
            .dead_letters(&queue, 10)
            .await
            .expect("inspect");
        (!letters.is_empty()).then_some(letters)
    })
    .await;
    assert_eq!(
        flaky.calls.load(Ordering::SeqCst),
        3,
        "1 + 2 attempts in all"
    );
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter.attempts, Some(3));
    assert_eq!(
        letter.original_routing_key.as_deref(),
        Some("order.created")
    );
    assert_eq!(letter.original_queue.as_deref(), Some(queue.name.as_str()));
    assert!(
        letter
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("injected failure")),
        "{letter:?}"
    );

    // The instance is parked with its error, and the journal tells the story.
    let parked = instance(&tdb.db, order_id).await;
    assert!(parked.faulted);
    assert_eq!(parked.attempts, 3);
    assert_eq!(parked.state, "pending");
    assert!(
        parked
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("injected failure"))
    );
    let journal = journal_of(&tdb.db, order_id).await;
    let failures: Vec<(String, i32, bool)> = journal
        .iter()
        .filter(|j| j.outcome != "applied")
        .map(|j| (j.outcome.clone(), j.attempt, j.error.is_some()))
        .collect();
    assert_eq!(
        failures,
        vec![
            ("failed".to_owned(), 1, true),
            ("failed".to_owned(), 2, true),
            ("parked".to_owned(), 3, true)
        ]
    );

    // Operators see it in the list of parked sagas.
    let listed = engine.parked(10).await.expect("parked");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].correlation_id, order_id.to_string());

    // Resume (with the bug fixed): it re-runs from `pending` with a fresh budget.
    flaky.failing.store(false, Ordering::SeqCst);
    let resumed = engine.resume(&order_id.to_string()).await.expect("resume");
    assert_eq!(resumed.state, OrderState::Pending);
    assert!(matches!(
        resumed.rerun,
        Some(Handled::Applied {
            to: OrderState::Processing,
            ..
        })
    ));
    let after = instance(&tdb.db, order_id).await;
    assert!(!after.faulted);
    assert_eq!(after.attempts, 0);
    assert_eq!(order_status(&tdb.db, order_id).await, "processing");
    assert!(matches!(
        engine.resume(&order_id.to_string()).await,
        Err(SagaError::NotParked { .. })
    ));

    // Re-drive the dead letter: it goes back to the queue and is consumed;
    // the saga already moved on, so it is ignored, not applied twice.
    let moved = broker
        .transport
        .redrive(&queue, 100)
        .await
        .expect("redrive");
    assert_eq!(moved.len(), 1);
    eventually(
        Duration::from_secs(10),
        "the re-driven message consumed",
        || async {
            let journal = journal_of(&tdb.db, order_id).await;
            journal
                .iter()
                .any(|j| j.trigger == "OrderCreated" && j.outcome == "ignored")
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        broker
            .transport
            .dead_letters(&queue, 10)
            .await
            .expect("inspect")
            .len(),
        0
    );
    let timers = saga_timers::Entity::find()
        .filter(saga_timers::Column::CorrelationId.eq(order_id.to_string()))
        .count(&tdb.db)
        .await
        .expect("timers");
    assert_eq!(timers, 1, "one payment timer, not two");

    stop2.cancel();
    running
        .await
        .expect("join")
        .expect("consumer stopped cleanly");
    transport.close().await;
    transport2.close().await;
    broker.delete().await;
    tdb.drop().await;
}

#[tokio::test]
async fn a_retry_reloads_the_instance_instead_of_reusing_the_failed_attempt() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let broker = TestBroker::create(orders::topology::queues).await;
    let clock = ManualClock::new(t0());
    let transport = connect(&broker).await;
    let order_id = order_on_the_queue(&tdb.db, &transport).await;

    /// Fails the first attempt, and meanwhile someone else updates the row.
    struct MovedUnderUs {
        db: DatabaseConnection,
        versions: Mutex<Vec<i32>>,
    }
    #[async_trait]
    impl ApplyProbe<OrderSaga> for MovedUnderUs {
        async fn before_write(
            &self,
            instance: &saga_instances::Model,
            _input: &OrderInput,
        ) -> Result<(), SagaError> {
            let first = {
                let mut v = self.versions.lock().expect("lock");
                v.push(instance.version);
                v.len() == 1
            };
            if first {
                self.db
                    .execute_unprepared(&format!(
                        "UPDATE saga_instances SET version = version + 5 WHERE id = {}",
                        instance.id
                    ))
                    .await?;
                return Err(SagaError::Db(sea_orm::DbErr::Custom(
                    "first attempt fails".into(),
                )));
            }
            Ok(())
        }
    }
    let hook = Arc::new(MovedUnderUs {
        db: tdb.db.clone(),
        versions: Mutex::new(Vec::new()),
    });
    let engine = engine(&tdb.db, &clock, true).with_probe(hook.clone());
    let consumer = saga_consumer(transport.clone(), &broker.prefix, &engine);
    let mut stream = transport
        .subscribe(&topology::saga_queue(&broker.prefix), "t", 1)
        .await
        .expect("subscribe");
    let delivery = stream.next().await.expect("delivery").expect("ok");
    let outcome = consumer.process(delivery).await.expect("settled");
    assert_eq!(outcome, ConsumeOutcome::Handled { attempts: 2 });
    let seen = hook.versions.lock().expect("lock").clone();
    assert_eq!(seen, vec![0, 5], "the retry saw the fresh version");
    let row = instance(&tdb.db, order_id).await;
    assert_eq!(
        (row.state.as_str(), row.version, row.attempts),
        ("processing", 6, 0)
    );
    drop(stream);
    transport.close().await;
    broker.delete().await;
    tdb.drop().await;
}

#[tokio::test]
async fn an_unknown_message_type_goes_to_the_error_queue_at_once() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let broker = TestBroker::create(orders::topology::queues).await;
    let clock = ManualClock::new(t0());
    let transport = connect(&broker).await;
    let (snapshot, created) = place_order(&tdb.db, t0()).await;
    let flaky = Arc::new(FlakyEffect::default());
    let engine = engine(&tdb.db, &clock, true).with_probe(flaky.clone());
    let queue = topology::saga_queue(&broker.prefix);
    let bogus = Envelope {
        message_type: "OrderShipped".to_owned(),
        ..created
    };
    transport
        .publish_to_queue(
            &queue.name,
            &serde_json::to_vec(&bogus).expect("json"),
            BasicProperties::default().with_type(ShortString::from("OrderShipped")),
        )
        .await
        .expect("publish");
    let consumer = saga_consumer(transport.clone(), &broker.prefix, &engine);
    let mut stream = transport
        .subscribe(&queue, "t", 1)
        .await
        .expect("subscribe");
    let delivery = stream.next().await.expect("delivery").expect("ok");
    let outcome = consumer.process(delivery).await.expect("settled");
    assert!(
        matches!(&outcome, ConsumeOutcome::DeadLettered { attempts: 1, reason } if reason.contains("OrderShipped")),
        "{outcome:?}"
    );
    assert_eq!(flaky.calls.load(Ordering::SeqCst), 0, "no handler attempt");
    let row = instance(&tdb.db, snapshot.order_id).await;
    assert!(
        !row.faulted,
        "a bad message does not park the saga it names"
    );
    assert_eq!(row.attempts, 0);
    let letters = broker
        .transport
        .dead_letters(&queue, 10)
        .await
        .expect("inspect");
    assert_eq!(letters.len(), 1);
    drop(stream);
    transport.close().await;
    broker.delete().await;
    tdb.drop().await;
}

#[tokio::test]
async fn a_notification_that_keeps_failing_is_dead_lettered_and_redriven_with_a_fresh_budget() {
    use orders::notifications::NotificationHandler;
    use orders::topology::NOTIFICATIONS_CONSUMER;
    use saga::schema::message_failures as saga_message_failures;

    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let broker = TestBroker::create(orders::topology::queues).await;
    let transport = connect(&broker).await;
    let order_id = order_on_the_queue(&tdb.db, &transport).await;
    let queue = topology::notifications_queue(&broker.prefix);
    let consumer = Consumer::new(
        transport.clone(),
        queue.clone(),
        NOTIFICATIONS_CONSUMER,
        Arc::new(
            NotificationHandler::new(
                tdb.db.clone(),
                Arc::new(ManualClock::new(t0())),
                NOTIFICATIONS_CONSUMER,
            )
            .with_retry_budget(3),
        ),
        quick_retries(),
        1,
    );
    // A database error on every attempt (the table is away).
    tdb.db
        .execute_unprepared("ALTER TABLE notifications RENAME TO notifications_away")
        .await
        .expect("rename");
    let mut stream = transport
        .subscribe(&queue, "t", 1)
        .await
        .expect("subscribe");
    let delivery = stream.next().await.expect("delivery").expect("ok");
    let outcome = consumer.process(delivery).await.expect("settled");
    assert!(
        matches!(outcome, ConsumeOutcome::DeadLettered { attempts: 3, .. }),
        "{outcome:?}"
    );
    let budget = saga_message_failures::Entity::find()
        .all(&tdb.db)
        .await
        .expect("failures");
    assert_eq!(budget.len(), 1);
    assert_eq!(budget[0].attempts, 3);
    assert_eq!(budget[0].correlation_id, order_id.to_string());

    // Fixed; re-driven with a fresh budget, it is handled once.
    tdb.db
        .execute_unprepared("ALTER TABLE notifications_away RENAME TO notifications")
        .await
        .expect("rename back");
    let moved = broker.transport.redrive(&queue, 10).await.expect("redrive");
    let ids: Vec<uuid::Uuid> = moved
        .iter()
        .flatten()
        .filter_map(|i| i.parse().ok())
        .collect();
    assert_eq!(ids, vec![budget[0].message_id]);
    let forgotten = saga::failures::forget(&tdb.db, NOTIFICATIONS_CONSUMER, &ids)
        .await
        .expect("forget");
    assert_eq!(forgotten, 1);
    let delivery = stream.next().await.expect("delivery").expect("ok");
    let outcome = consumer.process(delivery).await.expect("settled");
    assert_eq!(outcome, ConsumeOutcome::Handled { attempts: 1 });
    assert_eq!(notifications_of(&tdb.db, order_id).await.len(), 1);
    drop(stream);
    transport.close().await;
    broker.delete().await;
    tdb.drop().await;
}
