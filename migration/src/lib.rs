//! Schema of order-saga and its idempotent seed data: the `saga` library's
//! tables (its own migrations, [`saga::schema::migrations`]), the order
//! domain's tables and the operator console's sessions.
//!
//! Applied by the API host at start (`Migrator::up`), and runnable on its own
//! with `cargo run -p migration --bin migrate` (reads `DATABASE_URL`).

pub use sea_orm_migration::prelude::*;

mod columns;
mod m20261124_000001_create_domain_tables;
mod m20261124_000003_seed_products;
mod m20261124_000005_create_idempotency_keys;
mod m20261210_000006_create_console_sessions;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        // The library's tables first (they do not refer to the domain's);
        // the names of all migrations are what a migrated database
        // remembers, so the order of the two lists does not matter to it.
        let mut all = saga::schema::migrations();
        all.extend([
            Box::new(m20261124_000001_create_domain_tables::Migration) as Box<dyn MigrationTrait>,
            Box::new(m20261124_000003_seed_products::Migration),
            Box::new(m20261124_000005_create_idempotency_keys::Migration),
            Box::new(m20261210_000006_create_console_sessions::Migration),
        ]);
        all
    }
}

/// Names of constraints that callers map to HTTP errors; keep them stable.
pub mod constraints {
    pub const USERS_EMAIL_KEY: &str = "uq_users_email";
    pub const USERS_ROLE_CHECK: &str = "ck_users_role";
    pub const PRODUCTS_NAME_KEY: &str = "uq_products_name";
    pub const PRODUCTS_STOCK_CHECK: &str = "ck_products_stock_non_negative";
    pub const PRODUCTS_PRICE_CHECK: &str = "ck_products_price_non_negative";
    pub const ORDERS_STATUS_CHECK: &str = "ck_orders_status";
    pub const ORDER_ITEMS_QUANTITY_CHECK: &str = "ck_order_items_quantity_positive";
    pub const NOTIFICATIONS_EVENT_TYPE_CHECK: &str = "ck_notifications_event_type";
    pub const NOTIFICATIONS_ORDER_EVENT_KEY: &str = "uq_notifications_order_event";
    pub const IDEMPOTENCY_KEYS_USER_KEY: &str = "uq_idempotency_keys_user_key";
}
