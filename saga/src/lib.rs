#![warn(missing_docs)]
//! `saga`: a saga / state-machine orchestrator. A saga is a definition
//! (states, inputs, a pure `decide`); the library persists and drives it:
//! one transaction per input (or per batch of inputs) with a version check,
//! a journal that explains every decision, a transactional outbox, an inbox
//! that makes every consumer exactly-once, durable timers, state timeouts,
//! a persisted retry budget with parking and resume, error queues,
//! transports (RabbitMQ, Kafka, in-process), metrics, trace context and a
//! test harness. Many saga types share one database and one broker.
//!
//! # Write your own saga
//!
//! This walks through `examples/shipment` (run it against the local
//! PostgreSQL and RabbitMQ with `cargo run -p saga --example shipment`): a
//! shipment keyed by a UUID, `requested -> allocated -> shipped |
//! cancelled`, with an allocation timer that is armed again after a failed
//! attempt (three attempts), a compensation when an allocated shipment is
//! cancelled, and a state timeout.
//!
//! ## 1. The definition: states, inputs, `decide`
//!
//! States and inputs are plain enums implementing [`SagaState`] (a stored
//! name, the final states) and [`SagaInput`] (a name for the journal, and one
//! sample of each kind for the generated table). Inputs serialize: the
//! journal keeps each one as JSON.
//!
//! ```ignore
//! #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
//! pub enum ShipmentState { Requested, Allocated, Shipped, Cancelled }
//!
//! #[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
//! pub enum ShipmentInput {
//!     Allocated,                            // the allocate timer found stock
//!     AllocationFailed { attempt: u32 },    // ... or did not
//!     ShipmentDispatched,                   // consumed
//!     CancelShipment,                       // consumed
//!     AllocationExpired,                    // the state timeout
//! }
//! ```
//!
//! The saga itself is a type implementing [`Saga`]; a value of it carries
//! the configuration (delays, timeouts). [`Saga::decide`] is the transition
//! table: pure and synchronous, one exhaustive `match (state, input)` that
//! answers every pair with [`Decision::to`] (apply, with effects),
//! [`Decision::ignore`] (a duplicate or late input) or [`Decision::reject`]
//! (a fault: the instance is parked for an operator):
//!
//! ```ignore
//! impl Saga for ShipmentSaga {
//!     const TYPE: &'static str = "shipment";          // stored with every row
//!     type State = ShipmentState;
//!     type Input = ShipmentInput;
//!     type Event = ShipmentEvent;                     // what it publishes
//!     type Timer = ShipmentTimer;                     // Allocate { attempt }
//!     type Effect = ShipmentEffect;                   // ReleaseAllocation
//!     type Data = ShipmentRequest;                    // what an instance keeps
//!
//!     fn start(&self, _: &ShipmentRequest) -> Start<Self> {
//!         Start::new(ShipmentState::Requested, "ShipmentRequested", "allocation timer armed")
//!             .schedule(ShipmentTimer::Allocate { attempt: 1 }, Duration::zero())
//!     }
//!
//!     fn decide(&self, state: ShipmentState, _: &ShipmentRequest, input: &ShipmentInput) -> Decision<Self> {
//!         match (state, *input) {
//!             (S::Requested, I::Allocated) => Decision::to(S::Allocated, "stock allocated").publish(E::Allocated),
//!             (S::Requested, I::AllocationFailed { attempt }) if attempt < 3 =>
//!                 Decision::to(S::Requested, "allocation retried")
//!                     .schedule(ShipmentTimer::Allocate { attempt: attempt + 1 }, self.retry_delay),
//!             (S::Requested, I::AllocationFailed { .. }) => Decision::to(S::Cancelled, "no stock").publish(E::Cancelled),
//!             (S::Requested, I::CancelShipment) =>
//!                 Decision::to(S::Cancelled, "cancelled").cancel(ShipmentTimer::ALLOCATE).publish(E::Cancelled),
//!             (S::Allocated, I::CancelShipment | I::AllocationExpired) =>
//!                 Decision::to(S::Cancelled, "stock released").effect(ShipmentEffect::ReleaseAllocation).publish(E::Cancelled),
//!             (S::Allocated, I::ShipmentDispatched) => Decision::to(S::Shipped, "dispatched").publish(E::Shipped),
//!             (S::Requested, I::ShipmentDispatched) => Decision::reject("dispatched before allocation"),
//!             // ... every other pair: Decision::ignore("late input: ...")
//!         }
//!     }
//!
//!     fn route(&self, envelope: &Envelope) -> Result<Routed<Self>, String> { /* ShipmentRequested
//!         starts an instance (Routed::Start(request)); ShipmentDispatched and CancelShipment are inputs */ }
//!
//!     fn state_timeouts(&self) -> Vec<StateTimeout<Self>> {
//!         vec![StateTimeout { state: S::Allocated, after: self.allocated_timeout, input: I::AllocationExpired }]
//!     }
//! }
//! ```
//!
//! Effects are [`Effect::Publish`] (an outbox row, published after the
//! commit), [`Effect::Schedule`] (a durable timer with a payload; scheduling
//! a kind again re-arms it, also after it fired), [`Effect::Cancel`] and
//! [`Effect::Domain`] (the saga's own work, below). Because the table is
//! code, [`describe::transitions`] lists it and [`describe::mermaid`] draws
//! it, for any saga; a test can check every (state, input) pair.
//!
//! ## 2. The hooks: what only the saga's code can do
//!
//! [`Hooks`] run inside the engine's transaction, so what they write commits
//! or rolls back with the transition. The shipment's `allocate` timer takes
//! stock off its own `shipment_stock` table and turns the timer into
//! `Allocated` or `AllocationFailed`; its compensation gives the stock back:
//!
//! ```ignore
//! #[async_trait]
//! impl Hooks<ShipmentSaga> for ShipmentHooks {
//!     async fn timer_input(&self, cx: &HookContext<'_, ShipmentSaga>, timer: &ShipmentTimer)
//!         -> Result<ShipmentInput, SagaError> {
//!         let ShipmentTimer::Allocate { attempt } = *timer;
//!         Ok(if allocate(cx).await? { ShipmentInput::Allocated } else { ShipmentInput::AllocationFailed { attempt } })
//!     }
//!     async fn effect(&self, cx: &HookContext<'_, ShipmentSaga>, effect: &ShipmentEffect) -> Result<(), SagaError> {
//!         match effect { ShipmentEffect::ReleaseAllocation => release(cx).await }
//!     }
//! }
//! ```
//!
//! A hook error rolls the transition back and spends an attempt of the
//! instance's retry budget ([`SagaError::Transient`] and database errors are
//! retried; [`SagaError::Effect`] parks at once). Hooks may also handle a
//! whole batch set-based ([`Hooks::effects_batch`], [`Hooks::entered_batch`]).
//!
//! ## 3. The schema
//!
//! The library owns its tables ([`schema`]); a service puts
//! [`schema::migrations`] first in its own migrator, then its own tables
//! (the shipment's stock and allocations). Every saga table keeps the saga
//! type, so other sagas can share the database.
//!
//! ## 4. Wiring
//!
//! An engine, a consumer of the saga's queue, a timer worker, a sweeper for
//! the state timeouts and an outbox relay; each has `run_until_stopped`:
//!
//! ```ignore
//! let outbox = OutboxHandle::new(chrono::Duration::seconds(5));
//! let engine = SagaEngine::new(ShipmentSaga::default(), db.clone())
//!     .with_hooks(ShipmentHooks)
//!     .with_outbox(outbox.clone());
//! let consumer = Consumer::new(transport.clone(), queue, "shipment-saga",
//!         Arc::new(SagaHandler::new(engine.clone(), "shipment-saga")), RetryPolicy::default(), 64)
//!     .with_batch_size(32);                                   // up to 32 messages per transaction
//! let timers = TimerWorker::new(engine.clone(), Duration::from_millis(100));
//! let sweeper = SweepWorker::new(engine.clone(), Duration::from_secs(60));
//! let relay = OutboxRelay::new(db, transport, Arc::new(SystemClock), RelaySettings::default(), outbox);
//! tokio::join!(consumer.run_until_stopped(stop.clone()), timers.run_until_stopped(stop.clone()),
//!              sweeper.run_until_stopped(stop.clone()), relay.run_until_stopped(stop.clone()));
//! ```
//!
//! ## 5. Tests
//!
//! [`testing::harness::SagaHarness`] (feature `testing`) runs the saga
//! in-process on SQLite, the in-memory transport and a virtual clock:
//! *given* an instance, *when* a message or a command arrives or time
//! passes, *then* its state, the journal, the pending timers, and what was
//! consumed and published (`saga/tests/shipment.rs`). [`testing`] also gives
//! each integration test its own PostgreSQL database and broker topology.
//!
//! # The guarantees
//!
//! - **At-least-once delivery, exactly-once effects.** Messages are
//!   persistent and acknowledged only after the transaction that handled
//!   them committed; each consumer records `(consumer, message_id)` in the
//!   inbox in that transaction, so a redelivery changes nothing.
//! - **Outbox atomicity.** Events are rows written with the state change;
//!   the [`outbox`] relay publishes them with publisher confirms right after
//!   the commit (and, as a safety net, polls for rows whose short lease ran
//!   out, e.g. after a `kill -9`).
//! - **Optimistic concurrency.** Instance updates are `WHERE version = v`; a
//!   writer that loses a race reloads and decides again, so two inputs
//!   racing on one instance end in one decision each, in some order.
//! - **Durable timers and state timeouts**, fired and swept by whichever
//!   worker gets them (`SKIP LOCKED`), per saga type.
//! - **Persisted retries and parking.** A failing input is retried with
//!   backoff ([`retry::RetryPolicy`]); the attempt count lives with the
//!   instance, so every runner and restart share one budget; when it is
//!   spent the message goes to its error queue and the instance is parked
//!   until [`SagaEngine::resume`].
//! - **Batches.** The same transaction can carry many inputs (messages,
//!   timers, timeouts), written set-based; a batch that fails is split, so a
//!   poison input is retried and parked alone.
//! - **Journal.** Every input, applied, ignored, failed, parked or resumed,
//!   is a `saga_transitions` row with the input as JSON: why any instance is
//!   where it is.
//!
//! # Modules
//!
//! - [`definition`], [`describe`]: what a saga is, and its generated table.
//! - [`engine`]: runs a saga; [`hooks`]: the saga's effectful half.
//! - [`consumer`], [`workers`], [`outbox`]: the loops (`run_until_stopped`).
//! - [`inbox`], [`failures`], [`journal`], [`retry`]: idempotency keys,
//!   per-message budgets, the journal, the retry policy.
//! - [`schema`]: the tables, their entities and migrations.
//! - [`transport`]: RabbitMQ (lapin), Kafka (rdkafka, feature `kafka`) and
//!   in-process, behind one trait; [`transport::status`] tracks consumers
//!   for readiness.
//! - [`admin`]: operating sagas by type name (parked, resume, diagrams).
//! - [`metrics`]: metric names and helpers (labelled by saga type).
//! - [`trace`]: W3C trace context stored with rows and carried in headers.
//! - [`message`]: the JSON envelope; [`clock`]: time, injected.
//! - `testing` (feature `testing`): the harness, per-test databases and
//!   topologies, a TCP proxy for fault tests.

pub mod admin;
pub mod clock;
pub mod consumer;
pub mod definition;
pub mod describe;
pub mod engine;
pub mod error;
pub mod failures;
pub mod hooks;
pub mod inbox;
pub mod inspect;
pub mod journal;
pub mod message;
pub mod metrics;
pub mod operator;
pub mod outbox;
pub mod retry;
pub mod schema;
#[cfg(feature = "testing")]
pub mod testing;
pub mod trace;
pub mod transport;
pub mod workers;

pub use definition::{
    Decision, Effect, NoEffect, NoTimer, Routed, Saga, SagaEffect, SagaEvent, SagaInput, SagaState,
    SagaTimer, Start, StateTimeout,
};
pub use engine::{EngineSettings, Handled, SagaEngine};
pub use error::{SagaError, TransportError};
pub use hooks::{HookContext, Hooks, NoHooks};
