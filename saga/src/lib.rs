#![warn(missing_docs)]
//! `saga`: the order lifecycle as a persisted state machine, with the
//! outbox, inbox, durable timers, retries and parking that make it safe to
//! run on a real broker and a real database.
//!
//! # The model
//!
//! An order saga is in one of four [states](machine::OrderState):
//! `pending -> processing -> completed | expired`. It moves only when the
//! pure transition table, [`machine::decide`], says so for an
//! [input](machine::OrderInput):
//!
//! | input | from | to | effects |
//! |---|---|---|---|
//! | `OrderCreated` (consumed) | pending | processing | schedule the payment timer |
//! | `PaymentDecided(approved)` (timer fired) | processing | completed | publish `OrderCompleted` |
//! | `PaymentDecided(declined)` | processing | processing | none (waits to expire) |
//! | `ExpirationDue` (sweep) | processing | expired | release stock, publish `OrderExpired` |
//!
//! Every other (state, input) pair is decided explicitly as *ignore* (a
//! duplicate or a late input, journaled and changing nothing) or *reject*
//! (a fault). [`machine::describe`] lists the whole table and
//! [`machine::mermaid`] draws it, both generated from `decide` itself.
//!
//! ```
//! use saga::machine::{decide, Decision, OrderInput, OrderState};
//!
//! // A late payment after expiry changes nothing.
//! let late = OrderInput::PaymentDecided { approved: true, draw: 0.1 };
//! assert!(matches!(decide(OrderState::Expired, late), Decision::Ignore { .. }));
//! ```
//!
//! # The engine and its guarantees
//!
//! [`OrderSagaEngine`] loads an instance, asks the machine, and commits the
//! decision in **one database transaction**: the instance row (conditional on
//! its `version`), the order's status, a journal row, outbox rows for
//! published events, timer rows, stock changes and the consumer's inbox row.
//!
//! - **At-least-once delivery.** Messages are persistent, queues durable,
//!   acknowledgements manual and sent only after the transaction commits. A
//!   crash between commit and ack redelivers the message.
//! - **Exactly-once effects.** Every message has a `message_id`; a consumer
//!   records `(consumer, message_id)` in the inbox in the same transaction as
//!   its effects, so a redelivered or duplicated message is acknowledged and
//!   skipped. Notifications are also unique per (order, event type).
//! - **Outbox atomicity.** Events are never published from a handler: they are
//!   outbox rows written with the state change, and the [`outbox`] relay
//!   publishes them with publisher confirms and marks them sent. "State
//!   changed" and "event will be published" cannot disagree, and a broker
//!   outage only delays events.
//! - **Optimistic concurrency.** Instance updates are `WHERE version = v`; a
//!   writer that loses the race reloads and decides again, so an expiry and a
//!   payment racing on one order end in one terminal state and one event.
//! - **Durable timers.** "Decide the payment in 5 s" is a row with a due
//!   time, fired by whichever runner gets it (`SKIP LOCKED`); nothing waits in
//!   memory or in the broker, and timers can be queried.
//! - **Persisted retries and parking.** A failing input is retried with
//!   exponential backoff and jitter ([`consumer::RetryPolicy`]); each attempt
//!   reloads the instance. The attempt count is saved with the instance (or,
//!   for messages without one, per message in `saga_message_failures`), so
//!   every runner and restart share one budget. When it is spent the message
//!   goes to `<queue>.error` with `x-error-reason`, `x-attempts`,
//!   `x-original-routing-key` and `x-original-queue` headers, and the
//!   instance is *parked* (faulted) until [`OrderSagaEngine::resume`]. An
//!   undecodable message or one of an unknown type goes to the error queue at
//!   once. While the database is unreachable, no budget is spent.
//! - **Journal.** Every input, applied, ignored, failed, parked or resumed,
//!   is a `saga_transitions` row (from, to, trigger, message id, attempt,
//!   payment draw and decision, error, time): the history of any order.
//! - **Connection resilience.** [`transport::rabbitmq::RabbitTransport`]
//!   reconnects with backoff, declares its topology again and resubscribes
//!   its consumers; a consumer stream does not end because the broker left.
//!
//! # Modules
//!
//! - [`machine`]: the pure transition table (no I/O).
//! - [`engine`]: applies it, one transaction per input.
//! - [`outbox`]: the relay that publishes committed events with confirms.
//! - [`consumer`]: queue consumers with the persisted retry budget.
//! - [`inbox`], [`failures`]: idempotency keys and per-message budgets.
//! - [`notifications`]: the audit trail and the fake e-mail.
//! - [`transport`]: RabbitMQ (lapin) behind a trait; [`transport::status`]
//!   tracks consumer registration and in-flight deliveries for readiness.
//! - [`metrics`]: metric names and recording helpers (the `metrics` facade).
//! - [`topology`]: the queue names every host agrees on.
//! - [`trace`]: W3C trace context stored with rows and carried in headers.
//! - [`message`]: the JSON envelope and the typed order event contracts.
//! - [`clock`], [`payment`]: time and randomness, injected.
//! - `testing` (feature `testing`): `testing::harness::SagaHarness` runs the
//!   whole saga in-process (in-memory SQLite, in-memory transport, virtual
//!   clock) and lets a test assert what was consumed and published and which
//!   state each order is in, without waiting; plus per-test PostgreSQL
//!   databases and RabbitMQ topologies, and a TCP proxy for fault tests.
//!
//! See `examples/` for another service using the crate.

pub mod clock;
pub mod consumer;
pub mod engine;
pub mod error;
pub mod failures;
pub mod inbox;
pub mod machine;
pub mod message;
pub mod metrics;
pub mod notifications;
pub mod outbox;
pub mod payment;
#[cfg(feature = "testing")]
pub mod testing;
pub mod topology;
pub mod trace;
pub mod transport;

pub use engine::{Customer, EngineSettings, Handled, OrderSagaEngine, PlacedOrder};
pub use error::{SagaError, TransportError};
pub use machine::{OrderEvent, OrderInput, OrderState};
