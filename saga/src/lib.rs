//! `saga`: the order lifecycle as a persisted state machine.
//!
//! - [`machine`]: the pure transition table (no I/O).
//! - [`engine`]: applies it in one database transaction per input
//!   (optimistic concurrency, journal, outbox, timers, inbox).
//! - [`outbox`]: the relay that publishes committed events with confirms.
//! - [`consumer`]: queue consumers with retries and an error queue.
//! - [`notifications`]: the audit trail and the fake e-mail.
//! - [`transport`]: RabbitMQ (lapin) behind a trait.
//! - [`topology`]: the queue names every host agrees on.

pub mod clock;
pub mod consumer;
pub mod engine;
pub mod error;
pub mod failures;
pub mod inbox;
pub mod machine;
pub mod message;
pub mod notifications;
pub mod outbox;
pub mod payment;
#[cfg(feature = "testing")]
pub mod testing;
pub mod topology;
pub mod transport;

pub use engine::{Customer, EngineSettings, Handled, OrderSagaEngine, PlacedOrder};
pub use error::{SagaError, TransportError};
pub use machine::{OrderEvent, OrderInput, OrderState};
