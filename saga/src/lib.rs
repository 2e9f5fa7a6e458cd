#![warn(missing_docs)]
//! `saga`: a saga / state-machine orchestrator library.
//!
//! (Crate documentation: see the "Write your own saga" walk-through, written
//! with the shipment example.)

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
