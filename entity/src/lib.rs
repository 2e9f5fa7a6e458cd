//! sea-orm entities for every table of order-saga.
//!
//! Generated-style data definitions only: no behaviour lives here. The schema
//! itself is owned by the `migration` crate; these structs mirror it.

pub mod idempotency_keys;
pub mod notifications;
pub mod order_items;
pub mod orders;
pub mod products;
pub mod saga_inbox;
pub mod saga_instances;
pub mod saga_message_failures;
pub mod saga_outbox;
pub mod saga_timers;
pub mod saga_transitions;
pub mod users;
