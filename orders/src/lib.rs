#![warn(missing_docs)]
//! The order lifecycle, `pending -> processing -> completed | expired`, as
//! one saga defined on the [`saga`] library, and the order domain around it.
//!
//! - [`definition`]: the saga definition ([`OrderSaga`]): states, inputs,
//!   events, the payment timer, the stock release, the pure transition
//!   table (with its exhaustive and property tests);
//! - [`hooks`]: its effectful half ([`OrderHooks`]: the payment draw, the
//!   `orders.status` column, releasing stock) and [`hooks::place_order`]
//!   (reserving stock, the order rows and the saga's start in one
//!   transaction);
//! - [`notifications`]: the audit trail and the fake e-mail, a consumer of
//!   the order events;
//! - [`contracts`]: the instance data and the event payloads other services
//!   read; [`topology`]: the queue names; [`payment`]: the simulated payment
//!   provider; [`metrics`]: orders by status; [`error`]: [`OrderError`].
//! - `testing` (feature `testing`): the order saga in the generic harness.
//!
//! The engine, the outbox, the inbox, the timers, the retries, the
//! transports and the schema of the saga tables are the library's; this
//! crate only defines the saga and its domain.

pub mod contracts;
pub mod definition;
pub mod error;
pub mod hooks;
pub mod metrics;
pub mod notifications;
pub mod payment;
#[cfg(feature = "testing")]
pub mod testing;
pub mod topology;

pub use definition::{OrderEffect, OrderEvent, OrderInput, OrderSaga, OrderState, OrderTimer};
pub use error::OrderError;
pub use hooks::{Customer, Item, OrderHooks, PlacedOrder, place_items, place_many, place_order};
