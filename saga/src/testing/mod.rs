//! Test support (feature `testing`): every test gets its own PostgreSQL
//! database (migrated with the saga tables, or with a service's own
//! migrator) and its own RabbitMQ exchange and queues, so tests run in
//! parallel against the real services and leave nothing behind. Plus the
//! in-process [`harness::SagaHarness`] and a TCP proxy for fault tests.
//!
//! URLs come from `DATABASE_URL` (any database on the server; a fresh one is
//! created next to it) and `AMQP_URL`, with this machine's defaults otherwise.

use std::time::Duration;

pub mod harness;
pub mod proxy;
pub use proxy::TcpProxy;

use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection};
use sea_orm_migration::MigratorTrait;
use uuid::Uuid;

use crate::transport::QueueSpec;
use crate::transport::rabbitmq::{QueueType, RabbitTransport, Topology};

/// PostgreSQL of this machine (trust auth).
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// RabbitMQ of this machine.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

const START_POSTGRES: &str = "start it with: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start (see README, 'Services')";
const START_RABBITMQ: &str = "start it with: rabbitmq-server -detached && rabbitmqctl await_startup (see README, 'Services')";

/// `DATABASE_URL`, or [`DEFAULT_DATABASE_URL`].
pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned())
}

/// `AMQP_URL`, or [`DEFAULT_AMQP_URL`].
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| DEFAULT_AMQP_URL.to_owned())
}

/// `url` with its database name replaced by `name`.
pub fn with_database(url: &str, name: &str) -> String {
    let base = url.split('?').next().unwrap_or(url);
    match base.rfind('/') {
        Some(i) if i > base.find("://").map_or(0, |j| j + 2) => format!("{}/{name}", &base[..i]),
        _ => format!("{base}/{name}"),
    }
}

/// A freshly created and migrated database, dropped by [`TestDatabase::drop`].
pub struct TestDatabase {
    /// Connected to the new database.
    pub db: DatabaseConnection,
    /// `os_test_<uuid>`.
    pub name: String,
    /// Its URL (for hosts started by the test).
    pub url: String,
    admin: DatabaseConnection,
}

impl TestDatabase {
    /// Creates `os_test_<uuid>` on the server of `DATABASE_URL` with the saga
    /// tables ([`crate::schema::Migrator`]). Panics with how to start
    /// PostgreSQL when it cannot be reached.
    pub async fn create() -> Self {
        Self::create_with::<crate::schema::Migrator>().await
    }

    /// Like [`Self::create`], migrated with `M` (a service's migrator, which
    /// includes [`crate::schema::migrations`]).
    pub async fn create_with<M: MigratorTrait>() -> Self {
        let tdb = Self::create_empty().await;
        M::up(&tdb.db, None)
            .await
            .unwrap_or_else(|e| panic!("migrations failed on {}: {e}", tdb.name));
        tdb
    }

    /// A fresh database with no tables (tests of the migrations themselves).
    pub async fn create_empty() -> Self {
        let server = database_url();
        let admin = connect(&with_database(&server, "postgres"), 2)
            .await
            .unwrap_or_else(|e| {
                panic!("PostgreSQL at {server} is not reachable ({e}); {START_POSTGRES}")
            });
        let name = format!("os_test_{}", Uuid::new_v4().simple());
        admin
            .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
            .await
            .unwrap_or_else(|e| panic!("cannot create test database {name}: {e}"));
        let url = with_database(&server, &name);
        let db = connect(&url, 10)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to test database {name}: {e}"));
        Self {
            db,
            name,
            url,
            admin,
        }
    }

    /// Closes the pool and drops the database.
    pub async fn drop(self) {
        let _ = self.db.close().await;
        let _ = self
            .admin
            .execute_unprepared(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            ))
            .await;
        let _ = self.admin.close().await;
    }
}

async fn connect(url: &str, max: u32) -> Result<DatabaseConnection, sea_orm::DbErr> {
    let mut options = ConnectOptions::new(url.to_owned());
    options
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(10))
        .connect_timeout(Duration::from_secs(5))
        .sqlx_logging(false);
    Database::connect(options).await
}

/// An exchange and queues of this test's own, deleted by [`TestBroker::delete`].
pub struct TestBroker {
    /// Connected to the test's broker.
    pub transport: RabbitTransport,
    /// What was declared.
    pub topology: Topology,
    /// `test.<uuid>.events`.
    pub exchange: String,
    /// `test.<uuid>`: queue name prefix.
    pub prefix: String,
    /// The broker's URL.
    pub url: String,
}

impl TestBroker {
    /// Connects to `AMQP_URL` and declares the exchange `test.<uuid>.events`
    /// and the queues `queues` gives for the prefix `test.<uuid>`. Panics
    /// with how to start RabbitMQ when it cannot be reached.
    pub async fn create(queues: impl FnOnce(&str) -> Vec<QueueSpec>) -> Self {
        let url = amqp_url();
        let id = Uuid::new_v4().simple().to_string();
        let exchange = format!("test.{id}.events");
        let prefix = format!("test.{id}");
        let transport =
            RabbitTransport::connect(&url, &exchange, Duration::from_secs(5), "saga test")
                .await
                .unwrap_or_else(|e| {
                    panic!("RabbitMQ at {url} is not reachable ({e}); {START_RABBITMQ}")
                });
        let topology = Topology {
            exchange: exchange.clone(),
            queue_type: QueueType::Classic,
            queues: queues(&prefix),
        };
        transport
            .declare(&topology)
            .await
            .unwrap_or_else(|e| panic!("cannot declare the test topology: {e}"));
        Self {
            transport,
            topology,
            exchange,
            prefix,
            url,
        }
    }

    /// Deletes the exchange and queues, and closes the connection.
    pub async fn delete(self) {
        let _ = self.transport.delete(&self.topology).await;
        self.transport.close().await;
    }
}

/// Polls `check` every 25 ms until it returns `Some`, or panics after `within`
/// with `what` (no sleeping and hoping).
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {within:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn database_names_are_replaced() {
        assert_eq!(
            with_database("postgres://u@h:5432/postgres", "x"),
            "postgres://u@h:5432/x"
        );
        assert_eq!(
            with_database("postgres://u@h:5432/db?sslmode=disable", "x"),
            "postgres://u@h:5432/x"
        );
        assert_eq!(
            with_database("postgres://u@h:5432", "x"),
            "postgres://u@h:5432/x"
        );
    }
}
