//! sea-orm entities of order-saga's own tables (users, products, orders,
//! notifications, idempotency keys, console sessions). The saga tables belong to the `saga`
//! library (`saga::schema`).
//!
//! Generated-style data definitions only: no behaviour lives here. The schema
//! itself is owned by the `migration` crate; these structs mirror it.

pub mod console_sessions;
pub mod idempotency_keys;
pub mod notifications;
pub mod order_items;
pub mod orders;
pub mod products;
pub mod users;
