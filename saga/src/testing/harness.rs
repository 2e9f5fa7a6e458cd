//! A test harness for any saga, like MassTransit's `ITestHarness` and
//! NServiceBus' `AdvanceTime`: the real engine, outbox relay and consumers
//! run in-process on a private in-memory SQLite database (the same
//! migrations), the in-memory transport and a [`ManualClock`]. Nothing
//! waits on the wall clock. A test says what is **given** (instances that
//! started), **when** something happens (a message arrives, a command is
//! sent, time passes with [`SagaHarness::advance`]), and **then** asserts
//! what was published, what was consumed and which state each instance is
//! in.
//!
//! ```
//! use chrono::Duration;
//! use saga::definition::{Decision, NoEffect, NoTimer, Saga, SagaEvent, SagaInput, SagaState, Start};
//! use saga::testing::harness::SagaHarness;
//! use serde::{Deserialize, Serialize};
//!
//! /// A door that closes by itself after 10 s open.
//! struct Door;
//!
//! #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
//! enum State { Closed, Open }
//! impl SagaState for State {
//!     const ALL: &'static [Self] = &[State::Closed, State::Open];
//!     fn name(self) -> &'static str { match self { State::Closed => "closed", State::Open => "open" } }
//!     fn is_final(self) -> bool { false }
//! }
//!
//! #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
//! enum Input { Open, Close }
//! impl SagaInput for Input {
//!     fn name(&self) -> &'static str { match self { Input::Open => "Open", Input::Close => "Close" } }
//!     fn samples() -> Vec<(&'static str, Self)> { vec![("Open", Input::Open), ("Close", Input::Close)] }
//! }
//!
//! #[derive(Clone, Debug, PartialEq)]
//! struct Closed;
//! impl SagaEvent for Closed {
//!     fn message_type(&self) -> &'static str { "DoorClosed" }
//!     fn routing_key(&self) -> &'static str { "door.closed" }
//! }
//!
//! impl Saga for Door {
//!     const TYPE: &'static str = "door";
//!     type State = State;
//!     type Input = Input;
//!     type Event = Closed;
//!     type Timer = NoTimer;
//!     type Effect = NoEffect;
//!     type Data = ();
//!     fn start(&self, _: &()) -> Start<Self> { Start::new(State::Closed, "Installed", "installed") }
//!     fn decide(&self, state: State, _: &(), input: &Input) -> Decision<Self> {
//!         match (state, input) {
//!             (State::Closed, Input::Open) => Decision::to(State::Open, "opened"),
//!             (State::Open, Input::Close) => Decision::to(State::Closed, "closed").publish(Closed),
//!             (State::Closed, Input::Close) | (State::Open, Input::Open) => Decision::ignore("already so"),
//!         }
//!     }
//!     fn state_timeouts(&self) -> Vec<saga::definition::StateTimeout<Self>> {
//!         vec![saga::definition::StateTimeout { state: State::Open, after: Duration::seconds(10), input: Input::Close }]
//!     }
//! }
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let h = SagaHarness::builder(Door).start().await.unwrap();
//! h.given("front", ()).await.unwrap();                  // given: an installed door
//! h.when("front", Input::Open).await.unwrap();          // when: it is opened
//! assert_eq!(h.state("front").await.unwrap(), State::Open);
//! h.advance(Duration::seconds(10)).await.unwrap();      // ... and 10 s pass
//! assert_eq!(h.state("front").await.unwrap(), State::Closed); // then: it closed itself
//! assert_eq!(h.published_types("front"), ["DoorClosed"]);
//! # });
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use futures_util::FutureExt;
use futures_util::stream::{BoxStream, StreamExt};
use sea_orm::{
    ColumnTrait, ConnectOptions, Database, DatabaseConnection, DbErr, EntityTrait, QueryFilter,
    QueryOrder, TransactionTrait,
};
use sea_orm_migration::MigratorTrait;

use crate::clock::{Clock, ManualClock};
use crate::consumer::{ConsumeOutcome, Consumer, MessageHandler, SagaHandler};
use crate::definition::Saga;
use crate::engine::{
    ApplyProbe, EngineSettings, Handled, Instance, SagaEngine, Started, TimerFired,
};
use crate::error::{SagaError, TransportError};
use crate::hooks::{Hooks, NoHooks};
use crate::message::Envelope;
use crate::outbox::{OutboxHandle, OutboxRelay, RelaySettings};
use crate::retry::RetryPolicy;
use crate::schema::{timers, transitions};
use crate::transport::memory::MemoryTransport;
use crate::transport::rabbitmq::{QueueType, Topology};
use crate::transport::{Delivery, OutgoingMessage, QueueSpec, Transport};

const EXCHANGE: &str = "harness.events";
const PREFIX: &str = "harness";
/// Upper bound of rounds in one [`SagaHarness::run_until_idle`], so a
/// livelock fails the test instead of hanging it.
const MAX_ROUNDS: usize = 10_000;

type Migrate = for<'a> fn(
    &'a DatabaseConnection,
) -> Pin<Box<dyn Future<Output = Result<(), DbErr>> + Send + 'a>>;

fn migrate<M: MigratorTrait + 'static>(
    db: &DatabaseConnection,
) -> Pin<Box<dyn Future<Output = Result<(), DbErr>> + Send + '_>> {
    Box::pin(M::up(db, None))
}

/// Builds the saga's hooks once the database exists.
type HooksFactory<S> = Box<dyn FnOnce(&DatabaseConnection) -> Arc<dyn Hooks<S>> + Send>;

/// Builds the handler of an extra consumer once the database exists.
type HandlerFactory = Box<
    dyn FnOnce(&DatabaseConnection, &Arc<dyn Clock>, &RetryPolicy) -> Arc<dyn MessageHandler>
        + Send,
>;

/// One message a consumer took, and what became of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Consumed {
    /// The consumer's name.
    pub consumer: String,
    /// The envelope's type (`None` when the body could not be decoded).
    pub message_type: Option<String>,
    /// The correlation id (`None` when the body could not be decoded).
    pub correlation_id: Option<String>,
    /// Handled, duplicate, dead-lettered.
    pub outcome: ConsumeOutcome,
}

/// Configures a [`SagaHarness`].
pub struct HarnessBuilder<S: Saga> {
    saga: S,
    hooks: HooksFactory<S>,
    settings: EngineSettings,
    start: DateTime<Utc>,
    probe: Option<Arc<dyn ApplyProbe<S>>>,
    migrate: Migrate,
    consumer: String,
    routing_keys: Vec<String>,
    extra: Vec<(String, Vec<String>, HandlerFactory)>,
}

impl<S: Saga> HarnessBuilder<S> {
    /// The saga's hooks.
    pub fn hooks<H: Hooks<S>>(mut self, hooks: H) -> Self {
        let hooks: Arc<dyn Hooks<S>> = Arc::new(hooks);
        self.hooks = Box::new(move |_| hooks);
        self
    }

    /// The saga's hooks, built once the database exists (hooks that keep a
    /// connection of their own).
    pub fn hooks_with<H: Hooks<S>>(
        mut self,
        build: impl FnOnce(&DatabaseConnection) -> H + Send + 'static,
    ) -> Self {
        self.hooks = Box::new(move |db| Arc::new(build(db)));
        self
    }

    /// Engine settings (retry budget, batch size). The default retry budget
    /// is 3 attempts without backoff waits.
    pub fn settings(mut self, settings: EngineSettings) -> Self {
        self.settings = settings;
        self
    }

    /// The virtual clock's start (2026-01-01 12:00 UTC by default).
    pub fn starting_at(mut self, start: DateTime<Utc>) -> Self {
        self.start = start;
        self
    }

    /// Installs an [`ApplyProbe`] on the engine (to inject failures).
    pub fn probe(mut self, probe: Arc<dyn ApplyProbe<S>>) -> Self {
        self.probe = Some(probe);
        self
    }

    /// Migrates with `M` instead of the saga tables alone (a service's
    /// migrator, with its own tables).
    pub fn migrations<M: MigratorTrait + 'static>(mut self) -> Self {
        self.migrate = migrate::<M>;
        self
    }

    /// The saga consumes the messages published with these routing keys
    /// (through [`Saga::route`]), as the consumer `name` (its inbox key).
    pub fn consumes(mut self, name: impl Into<String>, routing_keys: &[&str]) -> Self {
        self.consumer = name.into();
        self.routing_keys = routing_keys.iter().map(|k| (*k).to_owned()).collect();
        self
    }

    /// Another consumer beside the saga's (e.g. notifications), on its own
    /// queue bound to `routing_keys`; `build` makes its handler from the
    /// harness' database, clock and retry policy.
    pub fn consumer<H: MessageHandler>(
        mut self,
        name: impl Into<String>,
        routing_keys: &[&str],
        build: impl FnOnce(&DatabaseConnection, &Arc<dyn Clock>, &RetryPolicy) -> H + Send + 'static,
    ) -> Self {
        let factory: HandlerFactory = Box::new(move |db, clock, retry| {
            let handler: Arc<dyn MessageHandler> = Arc::new(build(db, clock, retry));
            handler
        });
        self.extra.push((
            name.into(),
            routing_keys.iter().map(|k| (*k).to_owned()).collect(),
            factory,
        ));
        self
    }

    /// Creates the database, runs the migrations and wires everything up.
    pub async fn start(self) -> Result<SagaHarness<S>, SagaError> {
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
        (self.migrate)(&db).await?;

        let clock = ManualClock::new(self.start);
        let clock_arc: Arc<dyn Clock> = Arc::new(clock.clone());
        let outbox = OutboxHandle::default();
        let hooks = (self.hooks)(&db);
        let mut engine = SagaEngine::new(self.saga, db.clone())
            .with_clock(clock_arc.clone())
            .with_settings(self.settings)
            .with_outbox(outbox.clone());
        engine = engine.with_hooks(SharedHooks(hooks));
        if let Some(probe) = self.probe {
            engine = engine.with_probe(probe);
        }

        let mut queues = Vec::new();
        let saga_queue = (!self.routing_keys.is_empty()).then(|| QueueSpec {
            name: format!("{PREFIX}.{}", self.consumer),
            routing_keys: self.routing_keys.clone(),
        });
        queues.extend(saga_queue.clone());
        for (name, keys, _) in &self.extra {
            queues.push(QueueSpec {
                name: format!("{PREFIX}.{name}"),
                routing_keys: keys.clone(),
            });
        }
        // Every event is routable in the harness: an observer queue takes a
        // copy of everything published (what `published()` reports), as a
        // deployment's other subscribers would.
        queues.push(QueueSpec {
            name: format!("{PREFIX}.observed"),
            routing_keys: vec!["#".to_owned()],
        });
        let transport = MemoryTransport::new();
        transport.declare(&Topology {
            exchange: EXCHANGE.to_owned(),
            queue_type: QueueType::Classic,
            queues,
        });
        let shared: Arc<MemoryTransport> = Arc::new(transport.clone());
        let relay = OutboxRelay::new(
            db.clone(),
            shared.clone(),
            clock_arc.clone(),
            RelaySettings::default(),
            outbox,
        );
        let retry = engine.settings().retry.clone();
        let mut lanes: Vec<Box<dyn Drain>> = Vec::new();
        if let Some(queue) = saga_queue {
            let handler: Arc<dyn MessageHandler> =
                Arc::new(SagaHandler::new(engine.clone(), self.consumer.clone()));
            lanes.push(Box::new(
                Lane::new(
                    &shared,
                    queue,
                    self.consumer.clone(),
                    handler,
                    retry.clone(),
                )
                .await?,
            ));
        }
        for (name, keys, factory) in self.extra {
            let handler = factory(&db, &clock_arc, &retry);
            let queue = QueueSpec {
                name: format!("{PREFIX}.{name}"),
                routing_keys: keys,
            };
            lanes.push(Box::new(
                Lane::new(&shared, queue, name, handler, retry.clone()).await?,
            ));
        }
        Ok(SagaHarness {
            db,
            clock,
            engine,
            transport,
            relay,
            lanes,
            consumed: Mutex::new(Vec::new()),
        })
    }
}

/// Hooks shared between the builder's factory and the engine.
struct SharedHooks<S: Saga>(Arc<dyn Hooks<S>>);

#[async_trait]
impl<S: Saga> Hooks<S> for SharedHooks<S> {
    async fn timer_input(
        &self,
        cx: &crate::hooks::HookContext<'_, S>,
        timer: &S::Timer,
    ) -> Result<S::Input, SagaError> {
        self.0.timer_input(cx, timer).await
    }

    async fn effect(
        &self,
        cx: &crate::hooks::HookContext<'_, S>,
        effect: &S::Effect,
    ) -> Result<(), SagaError> {
        self.0.effect(cx, effect).await
    }

    async fn entered(
        &self,
        cx: &crate::hooks::HookContext<'_, S>,
        from: S::State,
        to: S::State,
    ) -> Result<(), SagaError> {
        self.0.entered(cx, from, to).await
    }

    async fn prepare_batch(
        &self,
        txn: &sea_orm::DatabaseTransaction,
        correlation_ids: &[String],
    ) -> Result<(), SagaError> {
        self.0.prepare_batch(txn, correlation_ids).await
    }

    async fn effects_batch(
        &self,
        txn: &sea_orm::DatabaseTransaction,
        now: DateTime<Utc>,
        calls: &[crate::hooks::EffectCall<'_, S>],
    ) -> Result<(), SagaError> {
        self.0.effects_batch(txn, now, calls).await
    }

    async fn entered_batch(
        &self,
        txn: &sea_orm::DatabaseTransaction,
        now: DateTime<Utc>,
        calls: &[crate::hooks::EnteredCall<'_, S>],
    ) -> Result<(), SagaError> {
        self.0.entered_batch(txn, now, calls).await
    }
}

/// A consumer and the subscription it is fed from.
struct Lane {
    name: String,
    consumer: Consumer<dyn MessageHandler>,
    stream: tokio::sync::Mutex<BoxStream<'static, Result<Delivery, TransportError>>>,
}

impl Lane {
    async fn new(
        transport: &Arc<MemoryTransport>,
        queue: QueueSpec,
        name: String,
        handler: Arc<dyn MessageHandler>,
        retry: RetryPolicy,
    ) -> Result<Self, SagaError> {
        let stream = transport
            .subscribe(&queue, &name, u16::MAX)
            .await
            .map_err(transport_error)?;
        let consumer = Consumer::new(
            transport.clone(),
            queue,
            name.clone(),
            handler,
            retry,
            u16::MAX,
        );
        Ok(Self {
            name,
            consumer,
            stream: tokio::sync::Mutex::new(stream),
        })
    }
}

#[async_trait]
trait Drain: Send + Sync {
    /// Processes every message ready now, one at a time.
    async fn drain(&self, log: &Mutex<Vec<Consumed>>) -> Result<usize, SagaError>;
}

#[async_trait]
impl Drain for Lane {
    async fn drain(&self, log: &Mutex<Vec<Consumed>>) -> Result<usize, SagaError> {
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
                    consumer: self.name.clone(),
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

/// A saga running in-process. See the [module docs](self).
pub struct SagaHarness<S: Saga> {
    db: DatabaseConnection,
    clock: ManualClock,
    engine: SagaEngine<S>,
    transport: MemoryTransport,
    relay: OutboxRelay,
    lanes: Vec<Box<dyn Drain>>,
    consumed: Mutex<Vec<Consumed>>,
}

impl<S: Saga> SagaHarness<S> {
    /// A builder for `saga`: no hooks, no consumers, a retry budget of 3
    /// without backoff waits, the clock at 2026-01-01 12:00 UTC, the saga
    /// tables alone.
    pub fn builder(saga: S) -> HarnessBuilder<S> {
        HarnessBuilder {
            saga,
            hooks: Box::new(|_| Arc::new(NoHooks)),
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
            probe: None,
            migrate: migrate::<crate::schema::Migrator>,
            consumer: S::TYPE.to_owned(),
            routing_keys: Vec::new(),
            extra: Vec::new(),
        }
    }

    /// The engine (to resume parked sagas, list them, ...).
    pub fn engine(&self) -> &SagaEngine<S> {
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

    /// **Given**: an instance `correlation_id` started with `data` (in its own
    /// transaction, as a service would), and everything that follows at the
    /// current virtual time has run.
    pub async fn given(&self, correlation_id: &str, data: S::Data) -> Result<Started, SagaError> {
        let txn = self.db.begin().await?;
        let started = match self.engine.start(&txn, correlation_id, data).await {
            Ok(started) => started,
            Err(e) => {
                txn.rollback().await?;
                return Err(e);
            }
        };
        txn.commit().await?;
        self.run_until_idle().await?;
        Ok(started)
    }

    /// **When**: the instance gets `input` as a command, then everything
    /// that follows at the current virtual time runs.
    pub async fn when(
        &self,
        correlation_id: &str,
        input: S::Input,
    ) -> Result<Handled<S::State>, SagaError> {
        let handled = self.engine.send(correlation_id, input).await?;
        self.run_until_idle().await?;
        Ok(handled)
    }

    /// **When**: `envelope` is published on the bus with `routing_key` (as
    /// another service would), then everything that follows runs.
    pub async fn when_published(
        &self,
        envelope: &Envelope,
        routing_key: &str,
    ) -> Result<usize, SagaError> {
        let body = serde_json::to_vec(envelope)
            .map_err(|e| SagaError::Corrupt(format!("envelope: {e}")))?;
        let message = OutgoingMessage {
            message_id: envelope.message_id,
            message_type: envelope.message_type.clone(),
            correlation_id: envelope.correlation_id.clone(),
            routing_key: routing_key.to_owned(),
            body,
            trace: None,
        };
        for result in self
            .transport
            .publish(&[message])
            .await
            .map_err(transport_error)?
        {
            result.map_err(transport_error)?;
        }
        self.run_until_idle().await
    }

    /// Runs everything that can happen at the current virtual time until
    /// nothing more does: relays the outbox, hands every ready message to its
    /// consumer, fires due timers and applies state timeouts. Returns how
    /// many steps ran. An error from a timer or a sweep is returned (its
    /// failure is already recorded against the instance's budget).
    pub async fn run_until_idle(&self) -> Result<usize, SagaError> {
        let mut total = 0;
        for _ in 0..MAX_ROUNDS {
            let mut progressed = self.relay.try_relay_once().await?.published;
            for lane in &self.lanes {
                progressed += lane.drain(&self.consumed).await?;
            }
            while self.engine.try_fire_due_timer_once().await?.is_some() {
                progressed += 1;
            }
            progressed += self.engine.sweep_all().await?.timed_out;
            if progressed == 0 {
                return Ok(total);
            }
            total += progressed;
        }
        Err(SagaError::Corrupt(format!(
            "still busy after {MAX_ROUNDS} rounds: a livelock?"
        )))
    }

    /// **When**: the virtual clock moves forward by `by`, and everything due
    /// runs.
    pub async fn advance(&self, by: chrono::Duration) -> Result<usize, SagaError> {
        self.clock.advance(by);
        self.run_until_idle().await
    }

    /// Fires the next due timer, if any (without running anything else).
    pub async fn fire_next_timer(
        &self,
    ) -> Result<Option<TimerFired<S::State, S::Input>>, SagaError> {
        self.engine.try_fire_due_timer_once().await
    }

    /// Every message published so far, in order.
    pub fn published(&self) -> Vec<OutgoingMessage> {
        self.transport.published()
    }

    /// The types of the messages published for one instance, in order.
    pub fn published_types(&self, correlation_id: &str) -> Vec<String> {
        self.published()
            .into_iter()
            .filter(|m| m.correlation_id == correlation_id)
            .map(|m| m.message_type)
            .collect()
    }

    /// Every message consumed so far, in order, with its outcome.
    pub fn consumed(&self) -> Vec<Consumed> {
        self.consumed.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// **Then**: the instance's current state.
    pub async fn state(&self, correlation_id: &str) -> Result<S::State, SagaError> {
        self.engine.state(correlation_id).await
    }

    /// The instance (version, attempts, parked flag, last error, data).
    pub async fn instance(
        &self,
        correlation_id: &str,
    ) -> Result<Instance<S::State, S::Data>, SagaError> {
        self.engine
            .instance(correlation_id)
            .await?
            .ok_or_else(|| SagaError::UnknownInstance {
                saga_type: S::TYPE,
                correlation_id: correlation_id.to_owned(),
            })
    }

    /// The instance's journal, oldest first.
    pub async fn journal(
        &self,
        correlation_id: &str,
    ) -> Result<Vec<transitions::Model>, SagaError> {
        Ok(transitions::Entity::find()
            .filter(transitions::Column::SagaType.eq(S::TYPE))
            .filter(transitions::Column::CorrelationId.eq(correlation_id))
            .order_by_asc(transitions::Column::Id)
            .all(&self.db)
            .await?)
    }

    /// The instance's timers that have not fired, by due time.
    pub async fn pending_timers(
        &self,
        correlation_id: &str,
    ) -> Result<Vec<timers::Model>, SagaError> {
        Ok(timers::Entity::find()
            .filter(timers::Column::SagaType.eq(S::TYPE))
            .filter(timers::Column::CorrelationId.eq(correlation_id))
            .filter(timers::Column::FiredAt.is_null())
            .order_by_asc(timers::Column::DueAt)
            .all(&self.db)
            .await?)
    }
}

fn transport_error(e: TransportError) -> SagaError {
    SagaError::Corrupt(format!("in-memory transport: {e}"))
}
