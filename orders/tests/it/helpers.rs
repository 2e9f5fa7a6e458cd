use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};
use entity::{notifications, orders as order_rows, products, users};
use orders::contracts::{OrderLine, OrderSnapshot};
use orders::payment::FixedPayment;
use orders::{Customer, OrderHooks, OrderInput, OrderSaga};
use saga::clock::ManualClock;
use saga::consumer::RetryPolicy;
use saga::engine::{EngineSettings, SagaEngine};
use saga::message::Envelope;
use saga::schema::{outbox as saga_outbox, transitions as saga_transitions};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, DatabaseConnection, EntityTrait, PaginatorTrait, QueryFilter,
    QueryOrder, TransactionTrait,
};

pub fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0)
        .single()
        .expect("valid time")
}

/// The order saga with a 5 s payment and a 600 s processing timeout.
pub fn order_saga() -> OrderSaga {
    OrderSaga {
        payment_delay: chrono::Duration::seconds(5),
        processing_timeout: chrono::Duration::seconds(600),
    }
}

pub fn engine(
    db: &DatabaseConnection,
    clock: &ManualClock,
    approved: bool,
) -> SagaEngine<OrderSaga> {
    SagaEngine::new(order_saga(), db.clone())
        .with_hooks(OrderHooks::new(Arc::new(FixedPayment { approved })))
        .with_clock(Arc::new(clock.clone()))
        .with_settings(EngineSettings {
            max_conflict_retries: 10,
            retry: RetryPolicy {
                max_attempts: 3,
                initial_backoff: std::time::Duration::from_millis(10),
                max_backoff: std::time::Duration::from_millis(50),
            },
            sweep_batch_size: 50,
            sweep_workers: 1,
            timer_batch_size: 100,
        })
}

/// Places an order the way the API does: user, order, items, saga start, in
/// one transaction. Returns the snapshot and the queued `OrderCreated`.
pub async fn place_order(db: &DatabaseConnection, now: DateTime<Utc>) -> (OrderSnapshot, Envelope) {
    let first = products::Entity::find()
        .order_by_asc(products::Column::Id)
        .one(db)
        .await
        .expect("product query")
        .expect("seeded product");
    place_order_of(db, now, first.id, 2).await
}

/// A new customer (a user row) as of `now`.
pub async fn new_customer(db: &impl sea_orm::ConnectionTrait, now: DateTime<Utc>) -> Customer {
    let user = users::Entity::insert(users::ActiveModel {
        name: Set("Test User".into()),
        email: Set(format!("{}@example.com", uuid::Uuid::new_v4().simple())),
        password_hash: Set("not-a-real-hash".into()),
        role: Set("user".into()),
        created_at: Set(now),
        ..Default::default()
    })
    .exec_with_returning(db)
    .await
    .expect("user");
    Customer {
        user_id: user.id,
        email: user.email,
        name: user.name,
    }
}

/// Like [`place_order`], for `quantity` of product `product_id`.
pub async fn place_order_of(
    db: &DatabaseConnection,
    now: DateTime<Utc>,
    product_id: i64,
    quantity: i32,
) -> (OrderSnapshot, Envelope) {
    let txn = db.begin().await.expect("begin");
    let customer = new_customer(&txn, now).await;
    let product = products::Entity::find_by_id(product_id)
        .one(&txn)
        .await
        .expect("product query")
        .expect("seeded product");
    // An engine whose clock says `now`: the order is placed then.
    let placer = engine(db, &ManualClock::new(now), true);
    let placed = orders::place_order(
        &placer,
        &txn,
        &customer,
        vec![OrderLine {
            product_id: product.id,
            product_name: product.name.clone(),
            quantity,
            unit_price: product.price,
        }],
    )
    .await
    .expect("place order");
    let (snapshot, message_id) = (placed.snapshot, placed.message_id);
    txn.commit().await.expect("commit");
    let row = saga_outbox::Entity::find()
        .filter(saga_outbox::Column::MessageId.eq(message_id))
        .one(db)
        .await
        .expect("outbox query")
        .expect("outbox row");
    let envelope: Envelope = serde_json::from_value(row.body).expect("envelope");
    (snapshot, envelope)
}

/// The payment decision (draw, approved) of a journal row, if it has one.
pub fn payment_of(row: &saga_transitions::Model) -> Option<(f64, bool)> {
    match serde_json::from_value::<OrderInput>(row.input.clone()?).ok()? {
        OrderInput::PaymentDecided { approved, draw } => Some((draw, approved)),
        _ => None,
    }
}

pub async fn order_status(db: &DatabaseConnection, order_id: i64) -> String {
    order_rows::Entity::find_by_id(order_id)
        .one(db)
        .await
        .expect("order query")
        .expect("order exists")
        .status
}

/// Outbox rows of `message_type` for an order.
pub async fn outbox_count(db: &DatabaseConnection, order_id: i64, message_type: &str) -> u64 {
    saga_outbox::Entity::find()
        .filter(saga_outbox::Column::CorrelationId.eq(order_id.to_string()))
        .filter(saga_outbox::Column::MessageType.eq(message_type))
        .count(db)
        .await
        .expect("outbox count")
}

pub async fn notifications_of(db: &DatabaseConnection, order_id: i64) -> Vec<notifications::Model> {
    notifications::Entity::find()
        .filter(notifications::Column::OrderId.eq(order_id))
        .order_by_asc(notifications::Column::Id)
        .all(db)
        .await
        .expect("notifications")
}

pub async fn journal_of(db: &DatabaseConnection, order_id: i64) -> Vec<saga_transitions::Model> {
    saga_transitions::Entity::find()
        .filter(saga_transitions::Column::CorrelationId.eq(order_id.to_string()))
        .order_by_asc(saga_transitions::Column::Id)
        .all(db)
        .await
        .expect("journal")
}

/// A fresh connection to the test's broker (a second "process").
pub async fn connect(
    broker: &saga::testing::TestBroker,
) -> Arc<saga::transport::rabbitmq::RabbitTransport> {
    Arc::new(
        saga::transport::rabbitmq::RabbitTransport::connect(
            &broker.url,
            &broker.exchange,
            std::time::Duration::from_secs(5),
            "test",
        )
        .await
        .expect("connect"),
    )
}

/// A relay on `db` publishing to `transport` (50 ms polls, real clock).
pub fn relay(
    db: &DatabaseConnection,
    transport: Arc<dyn saga::transport::Transport>,
    signal: saga::outbox::OutboxHandle,
) -> saga::outbox::OutboxRelay {
    saga::outbox::OutboxRelay::new(
        db.clone(),
        transport,
        Arc::new(saga::clock::SystemClock),
        saga::outbox::RelaySettings {
            poll_interval: std::time::Duration::from_millis(50),
            retry_after: chrono::Duration::milliseconds(50),
            ..saga::outbox::RelaySettings::default()
        },
        signal,
    )
}

/// Retries that wait milliseconds, not seconds.
pub fn quick_retries() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        initial_backoff: std::time::Duration::from_millis(10),
        max_backoff: std::time::Duration::from_millis(50),
    }
}

/// The order saga's `OrderCreated` consumer on the test's saga queue.
pub fn saga_consumer(
    transport: Arc<dyn saga::transport::Transport>,
    prefix: &str,
    engine: &SagaEngine<OrderSaga>,
) -> saga::consumer::Consumer<saga::consumer::SagaHandler<OrderSaga>> {
    saga::consumer::Consumer::new(
        transport,
        orders::topology::saga_queue(prefix),
        orders::topology::ORDER_SAGA_CONSUMER,
        Arc::new(saga::consumer::SagaHandler::new(
            engine.clone(),
            orders::topology::ORDER_SAGA_CONSUMER,
        )),
        quick_retries(),
        8,
    )
}

/// A consumer (and optionally a relay) running in the background until
/// [`Running::stop`].
pub struct Running {
    stop: tokio_util::sync::CancellationToken,
    consuming: tokio::task::JoinHandle<Result<(), saga::TransportError>>,
    relaying: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    pub fn start<H: saga::consumer::MessageHandler + ?Sized>(
        consumer: saga::consumer::Consumer<H>,
        relay: Option<saga::outbox::OutboxRelay>,
    ) -> Self {
        let stop = tokio_util::sync::CancellationToken::new();
        let token = stop.clone();
        let consuming = tokio::spawn(async move { consumer.run_until_stopped(token).await });
        let relaying = relay.map(|relay| {
            let token = stop.clone();
            tokio::spawn(async move { relay.run_until_stopped(token).await })
        });
        Self {
            stop,
            consuming,
            relaying,
        }
    }

    /// Whether the consumer gave up on its own.
    pub fn consumer_finished(&self) -> bool {
        self.consuming.is_finished()
    }

    /// Stops both and checks the consumer stopped cleanly.
    pub async fn stop(self) {
        self.stop.cancel();
        self.consuming
            .await
            .expect("join")
            .expect("consumer stopped cleanly");
        if let Some(relaying) = self.relaying {
            relaying.await.expect("join");
        }
    }
}
