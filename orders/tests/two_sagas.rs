//! Two sagas on one PostgreSQL database and one RabbitMQ broker: the order
//! saga (this crate) and the shipment saga of the `saga` library's example
//! (`saga/examples/shipment/`), each with its own consumers, timer workers
//! and sweepers, sharing the saga tables and one outbox relay. Each saga
//! only ever touches its own instances, timers and journal rows; a due
//! timer of a third saga type that neither knows stalls neither (issue 13:
//! a timer worker that claimed the earliest due timer of any type got stuck
//! on one it could not read).

// The shipment example's files; not every item of them is used here.
#[allow(dead_code)]
#[path = "../../saga/examples/shipment/definition.rs"]
mod definition;
#[allow(dead_code)]
#[path = "../../saga/examples/shipment/hooks.rs"]
mod hooks;
#[allow(dead_code)]
#[path = "../../saga/examples/shipment/schema.rs"]
mod schema;
#[allow(dead_code)]
#[path = "../../saga/examples/shipment/topology.rs"]
mod topology;
// The order saga's test helpers (placing orders, the relay).
#[allow(dead_code)]
#[path = "it/helpers.rs"]
mod helpers;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, Utc};
use orders::payment::{FixedPayment, PaymentDraw, PaymentSimulator};
use orders::topology::{NOTIFICATIONS_CONSUMER, ORDER_SAGA_CONSUMER};
use orders::{OrderEvent, OrderHooks, OrderSaga, OrderState};
use saga::clock::{Clock, ManualClock, SystemClock};
use saga::consumer::{Consumer, SagaHandler};
use saga::engine::{EngineSettings, SagaEngine};
use saga::message::Envelope;
use saga::schema::{instances, outbox, timers, transitions};
use saga::testing::{TestBroker, TestDatabase, eventually};
use saga::transport::{OutgoingMessage, Transport};
use saga::workers::{SweepWorker, TimerWorker};
use saga::{Saga, SagaEvent as _, SagaState as _};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder,
};
use sea_orm_migration::{MigrationTrait, MigratorTrait};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::definition::{ShipmentMessage, ShipmentRequest, ShipmentSaga, ShipmentState};
use crate::helpers::{place_order, quick_retries, relay, t0};
use crate::hooks::ShipmentHooks;
use crate::topology::SHIPMENT_SAGA_CONSUMER;

/// The order tables (with the saga tables) and the shipment tables.
struct TwoSagasMigrator;

#[async_trait::async_trait]
impl MigratorTrait for TwoSagasMigrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        let mut all = migration::Migrator::migrations();
        all.push(Box::new(schema::CreateShipmentTables));
        all
    }
}

/// The order queues and the shipment queues on one exchange.
fn queues(prefix: &str) -> Vec<saga::transport::QueueSpec> {
    let mut all = orders::topology::queues(prefix);
    all.extend(topology::queues(prefix));
    all
}

/// A saga type neither engine knows, for the foreign timer.
const FOREIGN_TYPE: &str = "invoice";

/// Approves every other payment.
#[derive(Default)]
struct Alternating(AtomicUsize);

impl PaymentSimulator for Alternating {
    fn draw(&self) -> PaymentDraw {
        let approved = self.0.fetch_add(1, Ordering::SeqCst).is_multiple_of(2);
        PaymentDraw {
            value: if approved { 0.0 } else { 1.0 },
            approved,
        }
    }
}

fn settings() -> EngineSettings {
    EngineSettings {
        retry: quick_retries(),
        ..EngineSettings::default()
    }
}

/// An instance of [`FOREIGN_TYPE`] with a timer of a kind no saga here
/// knows, due an hour before `now`: inserted before anything else, so it
/// has the lowest id and the earliest due time. Returns (instance, timer).
async fn foreign_timer(
    db: &DatabaseConnection,
    now: DateTime<Utc>,
) -> (instances::Model, timers::Model) {
    let instance = instances::Entity::insert(instances::ActiveModel {
        saga_type: Set(FOREIGN_TYPE.to_owned()),
        correlation_id: Set("INV-1".to_owned()),
        state: Set("open".to_owned()),
        version: Set(0),
        attempts: Set(0),
        faulted: Set(false),
        last_error: Set(None),
        data: Set(serde_json::json!({})),
        state_entered_at: Set(now - Duration::days(1)),
        created_at: Set(now - Duration::days(1)),
        updated_at: Set(now - Duration::days(1)),
        traceparent: Set(None),
        tracestate: Set(None),
        ..Default::default()
    })
    .exec_with_returning(db)
    .await
    .expect("foreign instance");
    let timer = timers::Entity::insert(timers::ActiveModel {
        saga_type: Set(FOREIGN_TYPE.to_owned()),
        saga_instance_id: Set(instance.id),
        correlation_id: Set(instance.correlation_id.clone()),
        timer_kind: Set("dunning_due".to_owned()),
        payload: Set(Some(serde_json::json!({"dunning_due": {"level": 1}}))),
        due_at: Set(now - Duration::hours(1)),
        created_at: Set(now - Duration::days(1)),
        fired_at: Set(None),
        traceparent: Set(None),
        tracestate: Set(None),
        ..Default::default()
    })
    .exec_with_returning(db)
    .await
    .expect("foreign timer");
    (instance, timer)
}

/// The foreign instance and timer are exactly as inserted, with no journal.
async fn assert_untouched(
    db: &DatabaseConnection,
    instance: &instances::Model,
    timer: &timers::Model,
) {
    let now_instance = instances::Entity::find_by_id(instance.id)
        .one(db)
        .await
        .expect("instance query")
        .expect("foreign instance");
    assert_eq!(&now_instance, instance);
    let now_timer = timers::Entity::find_by_id(timer.id)
        .one(db)
        .await
        .expect("timer query")
        .expect("foreign timer");
    assert_eq!(&now_timer, timer);
    let journal = transitions::Entity::find()
        .filter(transitions::Column::SagaInstanceId.eq(instance.id))
        .all(db)
        .await
        .expect("journal");
    assert!(journal.is_empty(), "{journal:?}");
}

/// `ShipmentRequested` (or another shipment message) for `id`.
fn shipment_message(kind: ShipmentMessage, id: Uuid, payload: serde_json::Value) -> Envelope {
    Envelope {
        message_id: Uuid::new_v4(),
        message_type: kind.message_type().to_owned(),
        correlation_id: id.to_string(),
        causation_id: None,
        occurred_at: Utc::now(),
        initiated_by: None,
        payload,
    }
}

fn request(sku: &str, quantity: i32) -> serde_json::Value {
    serde_json::to_value(ShipmentRequest {
        order_ref: "order-7".to_owned(),
        sku: sku.to_owned(),
        quantity,
    })
    .expect("payload")
}

async fn publish(transport: &dyn Transport, kind: ShipmentMessage, envelope: &Envelope) {
    let message = OutgoingMessage {
        message_id: envelope.message_id,
        message_type: envelope.message_type.clone(),
        correlation_id: envelope.correlation_id.clone(),
        routing_key: kind.routing_key().to_owned(),
        body: serde_json::to_vec(envelope).expect("body"),
        trace: None,
    };
    for confirmed in transport.publish(&[message]).await.expect("publish") {
        confirmed.expect("confirmed");
    }
}

async fn instance_of(
    db: &DatabaseConnection,
    saga_type: &str,
    correlation_id: &str,
) -> Option<instances::Model> {
    instances::Entity::find()
        .filter(instances::Column::SagaType.eq(saga_type))
        .filter(instances::Column::CorrelationId.eq(correlation_id))
        .one(db)
        .await
        .expect("instance query")
}

async fn state_of(db: &DatabaseConnection, saga_type: &str, correlation_id: &str) -> String {
    instance_of(db, saga_type, correlation_id)
        .await
        .map(|i| i.state)
        .unwrap_or_default()
}

/// Every row of `saga_transitions` and `saga_timers` carries the type of
/// the instance it belongs to; each saga's rows are for its own instances
/// only, with its own triggers and timer kinds.
async fn assert_rows_belong_to_their_saga(
    db: &DatabaseConnection,
    orders: &[String],
    shipments: &[String],
) {
    let instances: HashMap<i64, instances::Model> = instances::Entity::find()
        .all(db)
        .await
        .expect("instances")
        .into_iter()
        .map(|i| (i.id, i))
        .collect();
    let owner = |id: &String| -> &str {
        if orders.contains(id) {
            OrderSaga::TYPE
        } else if shipments.contains(id) {
            ShipmentSaga::TYPE
        } else {
            FOREIGN_TYPE
        }
    };
    for i in instances.values() {
        assert_eq!(i.saga_type, owner(&i.correlation_id), "{i:?}");
    }
    let order_triggers = [
        "OrderPlaced",
        "OrderCreated",
        "PaymentDecided",
        "ExpirationDue",
    ];
    let shipment_triggers = [
        "ShipmentRequested",
        "Allocated",
        "AllocationFailed",
        "ShipmentDispatched",
        "CancelShipment",
        "AllocationExpired",
    ];
    for row in transitions::Entity::find().all(db).await.expect("journal") {
        let instance = &instances[&row.saga_instance_id];
        assert_eq!(row.saga_type, instance.saga_type, "{row:?}");
        assert_eq!(row.correlation_id, instance.correlation_id, "{row:?}");
        let triggers: &[&str] = if row.saga_type == OrderSaga::TYPE {
            &order_triggers
        } else {
            &shipment_triggers
        };
        assert!(triggers.contains(&row.trigger.as_str()), "{row:?}");
    }
    for timer in timers::Entity::find().all(db).await.expect("timers") {
        let instance = &instances[&timer.saga_instance_id];
        assert_eq!(timer.saga_type, instance.saga_type, "{timer:?}");
        let kind = match timer.saga_type.as_str() {
            "order" => "payment_due",
            "shipment" => "allocate",
            _ => "dunning_due",
        };
        assert_eq!(timer.timer_kind, kind, "{timer:?}");
    }
    // The outbox has no saga type column: each row is attributed by its
    // correlation id, and carries one of its saga's own event types.
    let order_events: Vec<&str> = OrderEvent::ALL.iter().map(|e| e.message_type()).collect();
    let shipment_events: Vec<&str> = definition::ShipmentEvent::ALL
        .iter()
        .map(|e| e.message_type())
        .collect();
    for row in outbox::Entity::find().all(db).await.expect("outbox") {
        let types = match owner(&row.correlation_id) {
            "order" => &order_events,
            "shipment" => &shipment_events,
            other => panic!("an outbox row of {other}: {row:?}"),
        };
        assert!(types.contains(&row.message_type.as_str()), "{row:?}");
    }
}

/// Event types in the outbox for `correlation_id`, oldest first.
async fn outbox_types(db: &DatabaseConnection, correlation_id: &str) -> Vec<String> {
    outbox::Entity::find()
        .filter(outbox::Column::CorrelationId.eq(correlation_id))
        .order_by_asc(outbox::Column::Id)
        .all(db)
        .await
        .expect("outbox")
        .into_iter()
        .map(|r| r.message_type)
        .collect()
}

#[tokio::test]
async fn both_sagas_run_side_by_side_on_one_database_and_one_broker() {
    let tdb = TestDatabase::create_with::<TwoSagasMigrator>().await;
    let broker = TestBroker::create(queues).await;
    let db = &tdb.db;
    // Issue 13: a due timer of a type neither saga knows, first and earliest.
    let (foreign, foreign_timer) = foreign_timer(db, Utc::now()).await;
    schema::set_stock(db, "WIDGET", 10).await.expect("stock");
    schema::set_stock(db, "GADGET", 0).await.expect("stock");

    let rabbit = helpers::connect(&broker).await;
    let transport: Arc<dyn Transport> = rabbit.clone();
    let signal = saga::outbox::OutboxHandle::default();
    let order_engine = SagaEngine::new(
        OrderSaga {
            payment_delay: Duration::milliseconds(50),
            processing_timeout: Duration::seconds(1),
        },
        db.clone(),
    )
    .with_hooks(OrderHooks::new(Arc::new(Alternating::default())))
    .with_settings(settings())
    .with_outbox(signal.clone());
    let shipment_engine = SagaEngine::new(
        ShipmentSaga {
            retry_delay: Duration::milliseconds(100),
            allocated_timeout: Duration::seconds(1),
        },
        db.clone(),
    )
    .with_hooks(ShipmentHooks)
    .with_settings(settings())
    .with_outbox(signal.clone());

    let order_consumer = helpers::saga_consumer(transport.clone(), &broker.prefix, &order_engine);
    let notifications = Consumer::new(
        transport.clone(),
        orders::topology::notifications_queue(&broker.prefix),
        NOTIFICATIONS_CONSUMER,
        Arc::new(orders::notifications::NotificationHandler::new(
            db.clone(),
            Arc::new(SystemClock),
            NOTIFICATIONS_CONSUMER,
        )),
        quick_retries(),
        8,
    );
    let shipment_consumer = Consumer::new(
        transport.clone(),
        topology::saga_queue(&broker.prefix),
        SHIPMENT_SAGA_CONSUMER,
        Arc::new(SagaHandler::new(
            shipment_engine.clone(),
            SHIPMENT_SAGA_CONSUMER,
        )),
        quick_retries(),
        8,
    );
    let poll = StdDuration::from_millis(20);
    let sweep = StdDuration::from_millis(100);
    let order_timers = TimerWorker::new(order_engine.clone(), poll);
    let shipment_timers = TimerWorker::new(shipment_engine.clone(), poll);
    let order_sweeper = SweepWorker::new(order_engine.clone(), sweep);
    let shipment_sweeper = SweepWorker::new(shipment_engine.clone(), sweep);
    let relay = relay(db, transport.clone(), signal);

    let stop = CancellationToken::new();
    let run = async {
        tokio::join!(
            order_consumer.run_until_stopped(stop.clone()),
            notifications.run_until_stopped(stop.clone()),
            shipment_consumer.run_until_stopped(stop.clone()),
            order_timers.run_until_stopped(stop.clone()),
            shipment_timers.run_until_stopped(stop.clone()),
            order_sweeper.run_until_stopped(stop.clone()),
            shipment_sweeper.run_until_stopped(stop.clone()),
            relay.run_until_stopped(stop.clone()),
        )
    };

    let play = async {
        // Four orders: every other payment is approved, the others expire.
        let mut orders = Vec::new();
        for _ in 0..4 {
            let (order, _) = place_order(db, Utc::now()).await;
            orders.push(order.order_id.to_string());
        }
        order_engine.outbox().notify();
        // Five shipments: two dispatched, one never in stock, one never
        // dispatched, one cancelled once allocated.
        let dispatched = [Uuid::new_v4(), Uuid::new_v4()];
        let no_stock = Uuid::new_v4();
        let expires = Uuid::new_v4();
        let cancelled = Uuid::new_v4();
        let requests = [
            (dispatched[0], request("WIDGET", 2)),
            (dispatched[1], request("WIDGET", 3)),
            (no_stock, request("GADGET", 1)),
            (expires, request("WIDGET", 1)),
            (cancelled, request("WIDGET", 2)),
        ];
        for (id, payload) in &requests {
            let envelope =
                shipment_message(ShipmentMessage::ShipmentRequested, *id, payload.clone());
            publish(&*transport, ShipmentMessage::ShipmentRequested, &envelope).await;
        }
        for (id, then) in [
            (dispatched[0], ShipmentMessage::ShipmentDispatched),
            (dispatched[1], ShipmentMessage::ShipmentDispatched),
            (cancelled, ShipmentMessage::CancelShipment),
        ] {
            let shipment = id.to_string();
            eventually(StdDuration::from_secs(20), "shipment allocated", || async {
                (state_of(db, ShipmentSaga::TYPE, &shipment).await == "allocated").then_some(())
            })
            .await;
            let envelope = shipment_message(then, id, serde_json::Value::Null);
            publish(&*transport, then, &envelope).await;
        }
        let shipments: Vec<String> = requests.iter().map(|(id, _)| id.to_string()).collect();
        eventually(
            StdDuration::from_secs(30),
            "every instance final",
            || async {
                for order in &orders {
                    let state = state_of(db, OrderSaga::TYPE, order).await;
                    if !OrderState::parse(&state).is_some_and(|s| s.is_final()) {
                        return None;
                    }
                }
                for shipment in &shipments {
                    let state = state_of(db, ShipmentSaga::TYPE, shipment).await;
                    if !ShipmentState::parse(&state).is_some_and(|s| s.is_final()) {
                        return None;
                    }
                }
                Some(())
            },
        )
        .await;
        stop.cancel();
        (orders, dispatched, no_stock, expires, cancelled)
    };
    let (results, (orders, dispatched, no_stock, expires, cancelled)) = tokio::join!(run, play);
    let (r1, r2, r3, (), (), (), (), ()) = results;
    r1.expect("order consumer");
    r2.expect("notifications consumer");
    r3.expect("shipment consumer");

    // Both made progress to their final states.
    let mut order_states = Vec::new();
    for order in &orders {
        let state = state_of(db, OrderSaga::TYPE, order).await;
        let events = outbox_types(db, order).await;
        let expected_event = match state.as_str() {
            "completed" => "OrderCompleted",
            "expired" => "OrderExpired",
            other => panic!("order {order} ended {other}"),
        };
        assert_eq!(events, ["OrderCreated", expected_event], "order {order}");
        order_states.push(state);
    }
    order_states.sort();
    assert_eq!(
        order_states,
        ["completed", "completed", "expired", "expired"]
    );
    for (id, state, events) in [
        (
            dispatched[0],
            "shipped",
            &["ShipmentAllocated", "ShipmentShipped"][..],
        ),
        (
            dispatched[1],
            "shipped",
            &["ShipmentAllocated", "ShipmentShipped"],
        ),
        (no_stock, "cancelled", &["ShipmentCancelled"]),
        (
            expires,
            "cancelled",
            &["ShipmentAllocated", "ShipmentCancelled"],
        ),
        (
            cancelled,
            "cancelled",
            &["ShipmentAllocated", "ShipmentCancelled"],
        ),
    ] {
        let id = id.to_string();
        assert_eq!(state_of(db, ShipmentSaga::TYPE, &id).await, state, "{id}");
        assert_eq!(outbox_types(db, &id).await, events, "{id}");
    }
    // The expired shipment and the cancelled one gave their widgets back.
    assert_eq!(schema::available(db, "WIDGET").await.expect("stock"), 5);
    let shipments: Vec<String> = [dispatched[0], dispatched[1], no_stock, expires, cancelled]
        .iter()
        .map(Uuid::to_string)
        .collect();
    assert_rows_belong_to_their_saga(db, &orders, &shipments).await;
    // Nothing parked; the foreign timer neither fired nor stalled anything.
    assert!(
        saga::engine::parked(db, None, 10)
            .await
            .expect("parked")
            .is_empty()
    );
    assert_untouched(db, &foreign, &foreign_timer).await;

    rabbit.close().await;
    broker.delete().await;
    tdb.drop().await;
}

#[tokio::test]
async fn each_sagas_sweep_moves_only_its_own_instances() {
    let tdb = TestDatabase::create_with::<TwoSagasMigrator>().await;
    let db = &tdb.db;
    let clock = ManualClock::new(t0());
    // Declined payments: the orders stay processing until they expire.
    let orders_engine = helpers::engine(db, &clock, false);
    let shipments_engine = SagaEngine::new(
        ShipmentSaga {
            retry_delay: Duration::seconds(1),
            allocated_timeout: Duration::seconds(60),
        },
        db.clone(),
    )
    .with_hooks(ShipmentHooks)
    .with_clock(Arc::new(clock.clone()))
    .with_settings(settings());
    schema::set_stock(db, "WIDGET", 10).await.expect("stock");

    let mut orders = Vec::new();
    for _ in 0..2 {
        let (order, created) = place_order(db, t0()).await;
        orders_engine
            .handle(ORDER_SAGA_CONSUMER, &created)
            .await
            .expect("processing");
        orders.push(order.order_id.to_string());
    }
    let mut shipments = Vec::new();
    for quantity in [1, 2] {
        let id = Uuid::new_v4();
        let requested = shipment_message(
            ShipmentMessage::ShipmentRequested,
            id,
            request("WIDGET", quantity),
        );
        shipments_engine
            .handle(SHIPMENT_SAGA_CONSUMER, &requested)
            .await
            .expect("requested");
        shipments.push(id.to_string());
    }
    // Instances whose state is named like the other saga's: a shipment
    // "processing" and an order "allocated", in them since long ago.
    let mut decoys = Vec::new();
    for (saga_type, state) in [
        (ShipmentSaga::TYPE, "processing"),
        (OrderSaga::TYPE, "allocated"),
    ] {
        let decoy = instances::Entity::insert(instances::ActiveModel {
            saga_type: Set(saga_type.to_owned()),
            correlation_id: Set(format!("decoy-{state}")),
            state: Set(state.to_owned()),
            version: Set(0),
            attempts: Set(0),
            faulted: Set(false),
            last_error: Set(None),
            data: Set(serde_json::json!({})),
            state_entered_at: Set(t0() - Duration::days(30)),
            created_at: Set(t0() - Duration::days(30)),
            updated_at: Set(t0() - Duration::days(30)),
            traceparent: Set(None),
            tracestate: Set(None),
            ..Default::default()
        })
        .exec_with_returning(db)
        .await
        .expect("decoy");
        decoys.push(decoy);
    }
    // The payments are declined, the allocations made.
    clock.advance(Duration::seconds(5));
    while orders_engine
        .try_fire_due_timer_once()
        .await
        .expect("order timer")
        .is_some()
    {}
    while shipments_engine
        .try_fire_due_timer_once()
        .await
        .expect("shipment timer")
        .is_some()
    {}
    for order in &orders {
        assert_eq!(state_of(db, OrderSaga::TYPE, order).await, "processing");
    }
    for shipment in &shipments {
        assert_eq!(
            state_of(db, ShipmentSaga::TYPE, shipment).await,
            "allocated"
        );
    }

    // Past both timeouts (600 s and 60 s): each sweep takes its own.
    clock.advance(Duration::seconds(601));
    let swept = orders_engine.sweep_all().await.expect("order sweep");
    assert_eq!((swept.examined, swept.timed_out), (2, 2));
    for order in &orders {
        assert_eq!(state_of(db, OrderSaga::TYPE, order).await, "expired");
    }
    for shipment in &shipments {
        assert_eq!(
            state_of(db, ShipmentSaga::TYPE, shipment).await,
            "allocated"
        );
    }
    let swept = shipments_engine.sweep_all().await.expect("shipment sweep");
    assert_eq!((swept.examined, swept.timed_out), (2, 2));
    for shipment in &shipments {
        assert_eq!(
            state_of(db, ShipmentSaga::TYPE, shipment).await,
            "cancelled"
        );
    }
    for order in &orders {
        assert_eq!(state_of(db, OrderSaga::TYPE, order).await, "expired");
    }
    assert_eq!(schema::available(db, "WIDGET").await.expect("stock"), 10);
    // Nothing left to sweep for either, and the decoys were never looked at.
    assert_eq!(orders_engine.sweep_all().await.expect("sweep").examined, 0);
    assert_eq!(
        shipments_engine.sweep_all().await.expect("sweep").examined,
        0
    );
    for decoy in &decoys {
        let now = instances::Entity::find_by_id(decoy.id)
            .one(db)
            .await
            .expect("query")
            .expect("decoy");
        assert_eq!(&now, decoy);
    }
    let expired_by: BTreeSet<(String, String)> = transitions::Entity::find()
        .filter(transitions::Column::Trigger.is_in(["ExpirationDue", "AllocationExpired"]))
        .all(db)
        .await
        .expect("journal")
        .into_iter()
        .map(|row| (row.saga_type, row.trigger))
        .collect();
    assert_eq!(
        expired_by,
        BTreeSet::from([
            ("order".to_owned(), "ExpirationDue".to_owned()),
            ("shipment".to_owned(), "AllocationExpired".to_owned()),
        ])
    );
    tdb.drop().await;
}

#[tokio::test]
async fn a_due_timer_of_another_saga_type_stalls_neither_saga() {
    let tdb = TestDatabase::create_with::<TwoSagasMigrator>().await;
    let db = &tdb.db;
    let clock = ManualClock::new(t0());
    // First and earliest: a timer of a third type, with a kind neither knows.
    let (foreign, foreign_timer) = foreign_timer(db, t0()).await;
    let orders_engine = SagaEngine::new(OrderSaga::default(), db.clone())
        .with_hooks(OrderHooks::new(Arc::new(FixedPayment { approved: true })))
        .with_clock(Arc::new(clock.clone()))
        .with_settings(settings());
    let shipments_engine = SagaEngine::new(ShipmentSaga::default(), db.clone())
        .with_hooks(ShipmentHooks)
        .with_clock(Arc::new(clock.clone()))
        .with_settings(settings());
    schema::set_stock(db, "WIDGET", 1).await.expect("stock");

    let (order, created) = place_order(db, t0()).await;
    orders_engine
        .handle(ORDER_SAGA_CONSUMER, &created)
        .await
        .expect("processing");
    let shipment = Uuid::new_v4();
    shipments_engine
        .handle(
            SHIPMENT_SAGA_CONSUMER,
            &shipment_message(
                ShipmentMessage::ShipmentRequested,
                shipment,
                request("WIDGET", 1),
            ),
        )
        .await
        .expect("requested");
    clock.advance(OrderSaga::default().payment_delay);

    // Each engine fires its own due timer, then finds nothing more: the
    // foreign one, due long before, is not theirs.
    let fired = shipments_engine
        .try_fire_due_timer_once()
        .await
        .expect("the shipment's timer fires")
        .expect("a due shipment timer");
    assert_eq!(
        (fired.correlation_id.as_str(), fired.kind.as_str()),
        (shipment.to_string().as_str(), "allocate")
    );
    let fired = orders_engine
        .try_fire_due_timer_once()
        .await
        .expect("the order's timer fires")
        .expect("a due order timer");
    assert_eq!(
        (fired.correlation_id, fired.kind.as_str()),
        (order.order_id.to_string(), "payment_due")
    );
    assert!(
        orders_engine
            .try_fire_due_timer_once()
            .await
            .expect("poll")
            .is_none()
    );
    assert!(
        shipments_engine
            .try_fire_due_timer_once()
            .await
            .expect("poll")
            .is_none()
    );
    assert_eq!(orders_engine.next_timer_due().await.expect("next"), None);
    assert_eq!(shipments_engine.next_timer_due().await.expect("next"), None);
    assert_eq!(
        state_of(db, OrderSaga::TYPE, &order.order_id.to_string()).await,
        "completed"
    );
    assert_eq!(
        state_of(db, ShipmentSaga::TYPE, &shipment.to_string()).await,
        "allocated"
    );

    // The timer loops, too, keep firing their own timers past it.
    let stop = CancellationToken::new();
    let order_timers = TimerWorker::new(orders_engine.clone(), StdDuration::from_millis(10));
    let shipment_timers = TimerWorker::new(shipments_engine.clone(), StdDuration::from_millis(10));
    let workers = async {
        tokio::join!(
            order_timers.run_until_stopped(stop.clone()),
            shipment_timers.run_until_stopped(stop.clone()),
        )
    };
    let check = async {
        let (second, _) = place_order(db, clock.now()).await;
        let created = outbox::Entity::find()
            .filter(outbox::Column::CorrelationId.eq(second.order_id.to_string()))
            .one(db)
            .await
            .expect("outbox")
            .expect("OrderCreated");
        let created: Envelope = serde_json::from_value(created.body).expect("envelope");
        orders_engine
            .handle(ORDER_SAGA_CONSUMER, &created)
            .await
            .expect("processing");
        let out_of_stock = Uuid::new_v4();
        shipments_engine
            .handle(
                SHIPMENT_SAGA_CONSUMER,
                &shipment_message(
                    ShipmentMessage::ShipmentRequested,
                    out_of_stock,
                    request("WIDGET", 1),
                ),
            )
            .await
            .expect("requested");
        clock.advance(OrderSaga::default().payment_delay);
        let order_id = second.order_id.to_string();
        eventually(
            StdDuration::from_secs(10),
            "the order's timer fired",
            || async {
                (state_of(db, OrderSaga::TYPE, &order_id).await == "completed").then_some(())
            },
        )
        .await;
        eventually(
            StdDuration::from_secs(10),
            "the shipment's first attempt fired",
            || async {
                let journal = journal(db, &out_of_stock.to_string()).await;
                journal
                    .iter()
                    .any(|row| row.trigger == "AllocationFailed")
                    .then_some(())
            },
        )
        .await;
        stop.cancel();
    };
    tokio::join!(workers, check);
    assert_untouched(db, &foreign, &foreign_timer).await;
    tdb.drop().await;
}

/// The journal of `correlation_id`, oldest first.
async fn journal(db: &DatabaseConnection, correlation_id: &str) -> Vec<transitions::Model> {
    transitions::Entity::find()
        .filter(transitions::Column::CorrelationId.eq(correlation_id))
        .order_by_asc(transitions::Column::Id)
        .all(db)
        .await
        .expect("journal")
}
