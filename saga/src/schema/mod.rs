//! The library's tables, their entities and their migrations.
//!
//! | table | what |
//! |---|---|
//! | `saga_instances` | one row per instance: type, correlation id, state, version, retry budget, parked flag, data (JSON) |
//! | `saga_transitions` | the journal: one row per input given to an instance (input as JSON), applied or not |
//! | `saga_outbox` | events waiting to be published |
//! | `saga_inbox` | `(consumer, message_id)` of every handled message |
//! | `saga_timers` | durable timers: type, instance, kind, payload, due time |
//! | `saga_message_failures` | retry budgets of messages that have no instance |
//! | `saga_operator_actions` | what operators did (resume, re-drive), who, and the counts before and after |
//!
//! No column belongs to one saga or one domain; every table holds every saga
//! type side by side. A service adds [`migrations`] to its own migrator,
//! before its own migrations:
//!
//! ```
//! use sea_orm_migration::prelude::*;
//!
//! pub struct Migrator;
//!
//! #[async_trait::async_trait]
//! impl MigratorTrait for Migrator {
//!     fn migrations() -> Vec<Box<dyn MigrationTrait>> {
//!         let mut all = saga::schema::migrations();
//!         // all.push(Box::new(m20270101_000001_create_my_tables::Migration));
//!         all
//!     }
//! }
//! ```
//!
//! or runs [`Migrator`] alone when it has no tables of its own. The
//! migrations run on PostgreSQL and on SQLite.

use sea_orm_migration::prelude::*;

mod columns;
mod m20261124_000002_create_saga_tables;
mod m20261124_000004_create_message_failures;
mod m20261124_000006_add_trace_context;
mod m20261202_000001_generic_saga_tables;
mod m20261210_000001_create_operator_actions;
mod m20261211_000001_index_parked_instances;

// The entities mirror the tables column for column (generated style); the
// table documentation above and each struct's comments say what they hold.
#[allow(missing_docs)]
/// `saga_inbox`: messages already handled, per consumer.
pub mod inbox;
#[allow(missing_docs)]
/// `saga_instances`: one row per saga instance.
pub mod instances;
#[allow(missing_docs)]
/// `saga_message_failures`: retry budgets of messages without an instance.
pub mod message_failures;
#[allow(missing_docs)]
/// `saga_operator_actions`: the operator-action log.
pub mod operator_actions;
#[allow(missing_docs)]
/// `saga_outbox`: events waiting to be published.
pub mod outbox;
#[allow(missing_docs)]
/// `saga_timers`: durable timers.
pub mod timers;
#[allow(missing_docs)]
/// `saga_transitions`: the journal.
pub mod transitions;

/// The saga tables' migrations, oldest first. Their names are part of the
/// schema's history: a database migrated by an earlier version recognises
/// them and only runs what is new.
pub fn migrations() -> Vec<Box<dyn MigrationTrait>> {
    vec![
        Box::new(m20261124_000002_create_saga_tables::Migration),
        Box::new(m20261124_000004_create_message_failures::Migration),
        Box::new(m20261124_000006_add_trace_context::Migration),
        Box::new(m20261202_000001_generic_saga_tables::Migration),
        Box::new(m20261210_000001_create_operator_actions::Migration),
        Box::new(m20261211_000001_index_parked_instances::Migration),
    ]
}

/// A migrator with the saga tables only, for a service that has no tables
/// of its own (`Migrator::up(&db, None)`).
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        migrations()
    }
}
