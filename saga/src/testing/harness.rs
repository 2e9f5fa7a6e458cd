//! A test harness for the order saga, like MassTransit's `ITestHarness`:
//! the real engine, outbox relay and consumers run in-process on a private
//! in-memory SQLite database (the same migrations), the in-memory transport
//! and a [`ManualClock`]. Nothing waits on the wall clock: a test places
//! orders, moves time with [`SagaHarness::advance`], and asserts what was
//! published, what was consumed and which state each saga is in.
//!
//! ```
//! use chrono::Duration;
//! use saga::machine::OrderState;
//! use saga::testing::harness::SagaHarness;
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let harness = SagaHarness::builder().approve_payments(true).start().await.unwrap();
//! let order = harness.place_order(2).await.unwrap();
//! harness.run_until_idle().await.unwrap();
//! assert_eq!(harness.state(order).await.unwrap(), OrderState::Processing);
//!
//! harness.advance(Duration::seconds(5)).await.unwrap(); // the payment timer fires
//! assert_eq!(harness.state(order).await.unwrap(), OrderState::Completed);
//! assert_eq!(harness.published_types(order), ["OrderCreated", "OrderCompleted"]);
//! # });
//! ```

use std::sync::{Arc, Mutex};

use chrono::{DateTime, TimeZone, Utc};
use entity::{notifications, products, saga_instances, saga_transitions, users};
use futures_util::FutureExt;
use futures_util::stream::{BoxStream, StreamExt};
use migration::{Migrator, MigratorTrait};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectOptions, Database, DatabaseConnection, EntityTrait,
    QueryFilter, QueryOrder, TransactionTrait,
};
use tokio::sync::Notify;

use crate::clock::{Clock, ManualClock};
use crate::consumer::{ConsumeOutcome, Consumer, MessageHandler, RetryPolicy};
use crate::engine::{ApplyHook, Customer, EngineSettings, OrderSagaEngine};
use crate::error::{SagaError, TransportError};
use crate::machine::{ORDER_SAGA, OrderState};
use crate::message::{Envelope, OrderLine};
use crate::notifications::{NotificationHandler, OrderCreatedHandler};
use crate::outbox::{OutboxRelay, RelaySettings};
use crate::payment::{FixedPayment, PaymentSimulator};
use crate::topology::{self, NOTIFICATIONS_CONSUMER, ORDER_SAGA_CONSUMER};
use crate::transport::memory::MemoryTransport;
use crate::transport::rabbitmq::QueueType;
use crate::transport::{Delivery, OutgoingMessage, Transport};

const EXCHANGE: &str = "harness.events";
const PREFIX: &str = "harness";
/// Upper bound of rounds in one [`SagaHarness::run_until_idle`], so a
/// livelock fails the test instead of hanging it.
const MAX_ROUNDS: usize = 10_000;

/// One message a consumer took, and what became of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Consumed {
    /// `order-saga` or `notifications`.
    pub consumer: String,
    /// The envelope's type (`None` when the body could not be decoded).
    pub message_type: Option<String>,
    /// The order id (`None` when the body could not be decoded).
    pub correlation_id: Option<String>,
    /// Handled, duplicate, dead-lettered.
    pub outcome: ConsumeOutcome,
}

/// Configures a [`SagaHarness`].
pub struct HarnessBuilder {
    payment: Arc<dyn PaymentSimulator>,
    settings: EngineSettings,
    start: DateTime<Utc>,
    hook: Option<Arc<dyn ApplyHook>>,
}

impl HarnessBuilder {
    /// Every payment approved (`true`, the default) or declined.
    pub fn approve_payments(mut self, approved: bool) -> Self {
        self.payment = Arc::new(FixedPayment { approved });
        self
    }

    /// Any payment simulator (e.g. a seeded [`crate::payment::RandomPayment`]).
    pub fn payment(mut self, payment: Arc<dyn PaymentSimulator>) -> Self {
        self.payment = payment;
        self
    }

    /// Engine settings (payment delay, processing timeout, retry budget).
    /// Retry backoff is not waited for in the harness' default settings.
    pub fn settings(mut self, settings: EngineSettings) -> Self {
        self.settings = settings;
        self
    }

    /// The virtual clock's start (2026-01-01 12:00 UTC by default).
    pub fn starting_at(mut self, start: DateTime<Utc>) -> Self {
        self.start = start;
        self
    }

    /// Installs an [`ApplyHook`] on the engine (to inject failures).
    pub fn hook(mut self, hook: Arc<dyn ApplyHook>) -> Self {
        self.hook = Some(hook);
        self
    }

    /// Creates the database, runs the migrations and wires everything up.
    pub async fn start(self) -> Result<SagaHarness, SagaError> {
        // A private in-memory database, kept alive by one pooled connection
        // that never expires.
        let url = format!(
            "sqlite:file:harness_{}?mode=memory&cache=shared",
            uuid::Uuid::new_v4().simple()
        );
        let mut options = ConnectOptions::new(url);
        options
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .sqlx_logging(false);
        let db = Database::connect(options).await?;
        Migrator::up(&db, None).await?;

        let clock = ManualClock::new(self.start);
        let clock_arc: Arc<dyn Clock> = Arc::new(clock.clone());
        let signal = Arc::new(Notify::new());
        let mut engine =
            OrderSagaEngine::new(db.clone(), clock_arc.clone(), self.payment, self.settings)
                .with_outbox_signal(signal.clone());
        if let Some(hook) = self.hook {
            engine = engine.with_hook(hook);
        }
        let transport = MemoryTransport::new();
        transport.declare(&topology::topology(EXCHANGE, PREFIX, QueueType::Classic));
        let shared: Arc<MemoryTransport> = Arc::new(transport.clone());
        let relay = OutboxRelay::new(
            db.clone(),
            shared.clone(),
            clock_arc.clone(),
            RelaySettings::default(),
            signal,
        );
        let retry = engine.settings().retry.clone();
        let saga_queue = topology::saga_queue(PREFIX);
        let notifications_queue = topology::notifications_queue(PREFIX);
        let saga = Lane::new(
            Consumer::new(
                shared.clone(),
                saga_queue.clone(),
                ORDER_SAGA_CONSUMER,
                Arc::new(OrderCreatedHandler::new(
                    engine.clone(),
                    ORDER_SAGA_CONSUMER,
                )),
                retry.clone(),
                u16::MAX,
            ),
            shared
                .subscribe(&saga_queue, ORDER_SAGA_CONSUMER, u16::MAX)
                .await
                .map_err(transport_error)?,
        );
        let notifications = Lane::new(
            Consumer::new(
                shared.clone(),
                notifications_queue.clone(),
                NOTIFICATIONS_CONSUMER,
                Arc::new(
                    NotificationHandler::new(db.clone(), clock_arc, NOTIFICATIONS_CONSUMER)
                        .with_retry_budget(retry.max_attempts),
                ),
                retry,
                u16::MAX,
            ),
            shared
                .subscribe(&notifications_queue, NOTIFICATIONS_CONSUMER, u16::MAX)
                .await
                .map_err(transport_error)?,
        );
        Ok(SagaHarness {
            db,
            clock,
            engine,
            transport,
            relay,
            saga,
            notifications,
            consumed: Mutex::new(Vec::new()),
        })
    }
}

/// A consumer and the subscription it is fed from.
struct Lane<H: MessageHandler> {
    consumer: Consumer<H>,
    stream: tokio::sync::Mutex<BoxStream<'static, Result<Delivery, TransportError>>>,
}

impl<H: MessageHandler> Lane<H> {
    fn new(
        consumer: Consumer<H>,
        stream: BoxStream<'static, Result<Delivery, TransportError>>,
    ) -> Self {
        Self {
            consumer,
            stream: tokio::sync::Mutex::new(stream),
        }
    }

    /// Processes every message ready now, one at a time.
    async fn drain(&self, name: &str, log: &Mutex<Vec<Consumed>>) -> Result<usize, SagaError> {
        let mut stream = self.stream.lock().await;
        let mut handled = 0;
        while let Some(Some(item)) = stream.next().now_or_never() {
            let delivery = item.map_err(transport_error)?;
            let envelope = Envelope::decode(&delivery.body).ok();
            let outcome = self
                .consumer
                .process(delivery)
                .await
                .map_err(transport_error)?;
            if let Ok(mut log) = log.lock() {
                log.push(Consumed {
                    consumer: name.to_owned(),
                    message_type: envelope.as_ref().map(|e| e.message_type.clone()),
                    correlation_id: envelope.map(|e| e.correlation_id),
                    outcome,
                });
            }
            handled += 1;
        }
        Ok(handled)
    }
}

/// The order saga running in-process. See the [module docs](self).
pub struct SagaHarness {
    db: DatabaseConnection,
    clock: ManualClock,
    engine: OrderSagaEngine,
    transport: MemoryTransport,
    relay: OutboxRelay,
    saga: Lane<OrderCreatedHandler>,
    notifications: Lane<NotificationHandler>,
    consumed: Mutex<Vec<Consumed>>,
}

impl SagaHarness {
    /// A builder with approved payments, a 5 s payment delay, a 600 s
    /// processing timeout and a retry budget of 3 without backoff waits.
    pub fn builder() -> HarnessBuilder {
        HarnessBuilder {
            payment: Arc::new(FixedPayment { approved: true }),
            settings: EngineSettings {
                retry: RetryPolicy {
                    max_attempts: 3,
                    initial_backoff: std::time::Duration::ZERO,
                    max_backoff: std::time::Duration::ZERO,
                },
                ..EngineSettings::default()
            },
            start: Utc
                .with_ymd_and_hms(2026, 1, 1, 12, 0, 0)
                .single()
                .unwrap_or_else(Utc::now),
            hook: None,
        }
    }

    /// The engine (to resume parked sagas, list them, ...).
    pub fn engine(&self) -> &OrderSagaEngine {
        &self.engine
    }

    /// The virtual clock.
    pub fn clock(&self) -> &ManualClock {
        &self.clock
    }

    /// The in-memory transport (to inspect queues or inject raw messages).
    pub fn transport(&self) -> &MemoryTransport {
        &self.transport
    }

    /// The database.
    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Places an order of `quantity` units of the first seeded product for a
    /// new customer, as the API does. Returns the order id.
    pub async fn place_order(&self, quantity: i32) -> Result<i64, SagaError> {
        let product = products::Entity::find()
            .order_by_asc(products::Column::Id)
            .one(&self.db)
            .await?
            .ok_or_else(|| SagaError::Corrupt("no seeded product".to_owned()))?;
        let now = self.clock.now();
        let txn = self.db.begin().await?;
        let email = format!("{}@harness.test", uuid::Uuid::new_v4().simple());
        let user = users::Entity::insert(users::ActiveModel {
            name: Set("Harness".to_owned()),
            email: Set(email.clone()),
            password_hash: Set("-".to_owned()),
            role: Set("user".to_owned()),
            created_at: Set(now),
            ..Default::default()
        })
        .exec_with_returning(&txn)
        .await?;
        let placed = OrderSagaEngine::place_order(
            &txn,
            now,
            &Customer {
                user_id: user.id,
                email,
                name: user.name,
            },
            vec![OrderLine {
                product_id: product.id,
                product_name: product.name,
                quantity,
                unit_price: product.price,
            }],
        )
        .await;
        match placed {
            Ok(placed) => {
                txn.commit().await?;
                Ok(placed.order.id)
            }
            Err(e) => {
                txn.rollback().await?;
                Err(e)
            }
        }
    }

    /// Runs everything that can happen at the current virtual time until
    /// nothing more does: relays the outbox, hands every ready message to its
    /// consumer, fires due timers and sweeps stale orders. Returns how many
    /// steps ran. An error from a timer or a sweep is returned (its failure is
    /// already recorded against the instance's budget).
    pub async fn run_until_idle(&self) -> Result<usize, SagaError> {
        let mut total = 0;
        for _ in 0..MAX_ROUNDS {
            let mut progressed = self.relay.try_relay_once().await?.published;
            progressed += self.saga.drain(ORDER_SAGA_CONSUMER, &self.consumed).await?;
            progressed += self
                .notifications
                .drain(NOTIFICATIONS_CONSUMER, &self.consumed)
                .await?;
            while self.engine.try_fire_due_timer_once().await?.is_some() {
                progressed += 1;
            }
            progressed += self.engine.expire_all_stale().await?.expired;
            if progressed == 0 {
                return Ok(total);
            }
            total += progressed;
        }
        Err(SagaError::Corrupt(format!(
            "still busy after {MAX_ROUNDS} rounds: a livelock?"
        )))
    }

    /// Moves the virtual clock forward and runs until idle.
    pub async fn advance(&self, by: chrono::Duration) -> Result<usize, SagaError> {
        self.clock.advance(by);
        self.run_until_idle().await
    }

    /// Every message published so far, in order.
    pub fn published(&self) -> Vec<OutgoingMessage> {
        self.transport.published()
    }

    /// The types of the messages published for one order, in order.
    pub fn published_types(&self, order_id: i64) -> Vec<String> {
        let id = order_id.to_string();
        self.published()
            .into_iter()
            .filter(|m| m.correlation_id == id)
            .map(|m| m.message_type)
            .collect()
    }

    /// Every message consumed so far, in order, with its outcome.
    pub fn consumed(&self) -> Vec<Consumed> {
        self.consumed.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// The order saga's current state.
    pub async fn state(&self, order_id: i64) -> Result<OrderState, SagaError> {
        let instance = self.instance(order_id).await?;
        instance
            .state
            .parse()
            .map_err(|e| SagaError::Corrupt(format!("{e}")))
    }

    /// The saga instance row (version, attempts, parked flag, last error).
    pub async fn instance(&self, order_id: i64) -> Result<saga_instances::Model, SagaError> {
        saga_instances::Entity::find()
            .filter(saga_instances::Column::SagaType.eq(ORDER_SAGA))
            .filter(saga_instances::Column::CorrelationId.eq(order_id.to_string()))
            .one(&self.db)
            .await?
            .ok_or_else(|| SagaError::UnknownInstance {
                saga_type: ORDER_SAGA,
                correlation_id: order_id.to_string(),
            })
    }

    /// The order's journal, oldest first.
    pub async fn journal(&self, order_id: i64) -> Result<Vec<saga_transitions::Model>, SagaError> {
        Ok(saga_transitions::Entity::find()
            .filter(saga_transitions::Column::CorrelationId.eq(order_id.to_string()))
            .order_by_asc(saga_transitions::Column::Id)
            .all(&self.db)
            .await?)
    }

    /// The order's audit notifications, oldest first.
    pub async fn notifications(
        &self,
        order_id: i64,
    ) -> Result<Vec<notifications::Model>, SagaError> {
        Ok(notifications::Entity::find()
            .filter(notifications::Column::OrderId.eq(order_id))
            .order_by_asc(notifications::Column::Id)
            .all(&self.db)
            .await?)
    }
}

fn transport_error(e: TransportError) -> SagaError {
    SagaError::Corrupt(format!("in-memory transport: {e}"))
}
