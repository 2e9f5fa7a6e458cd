//! The system measured: the API, end to end, the 5 s burst and the
//! expiration sweep.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::ProgressBar;
use orders::payment::FixedPayment;
use orders::{OrderHooks, OrderSaga};
use saga::engine::{EngineSettings, SagaEngine};
use saga::testing::{TestBroker, TestDatabase};
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};
use serde::Serialize;

use crate::stack::{Hosts, Load, Stack, StackSpec, add_products};
use crate::stats::{Latency, rate};

/// Products in each scenario's catalogue (orders spread over them).
pub const CATALOGUE: usize = 256;

/// Peak RSS of the hosts of one scenario, in MiB.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Memory {
    pub api_mib: Option<f64>,
    pub runner_mib: Option<f64>,
}

impl Memory {
    fn of(stack: &Stack) -> Self {
        let rss = stack.peak_rss_mib();
        let find = |name: &str| rss.iter().find(|(n, _)| *n == name).map(|(_, m)| *m);
        Self {
            api_mib: find("api"),
            runner_mib: find("runner"),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ApiResult {
    pub requests: usize,
    pub seconds: f64,
    pub per_second: f64,
    pub latency: Latency,
    pub failures: usize,
    pub memory: Memory,
}

fn check_load(load: &Load, what: &str) -> anyhow::Result<()> {
    if load.failures > 0 {
        bail!(
            "{what}: {} of the requests failed, first: {}",
            load.failures,
            load.first_failure.as_deref().unwrap_or("?")
        );
    }
    Ok(())
}

/// A database with the bench catalogue and a broker topology of the run's own.
pub struct Services {
    pub db: TestDatabase,
    pub broker: TestBroker,
    pub products: Vec<i64>,
}

impl Services {
    pub async fn create() -> anyhow::Result<Self> {
        let db = TestDatabase::create_with::<migration::Migrator>().await;
        let broker = TestBroker::create(orders::topology::queues).await;
        let products = match add_products(&db.db, CATALOGUE).await {
            Ok(p) => p,
            Err(e) => {
                db.drop().await;
                broker.delete().await;
                return Err(e);
            }
        };
        Ok(Self {
            db,
            broker,
            products,
        })
    }

    pub async fn remove(self) {
        self.db.drop().await;
        self.broker.delete().await;
    }
}

/// `POST /api/orders`: `count` requests from `clients` clients against the
/// api alone (no runner competing for the cores).
pub async fn api(
    hosts: &Hosts,
    services: &Services,
    label: &str,
    count: usize,
    clients: usize,
    progress: &ProgressBar,
) -> anyhow::Result<ApiResult> {
    let spec = StackSpec {
        label,
        runner: false,
        scheduler: false,
        payment_delay_ms: 0,
        success_rate: 1.0,
    };
    let mut stack = Stack::start(hosts, &services.db, &services.broker, spec).await?;
    let result = async {
        let token = stack.api.user_token().await?;
        let load = stack
            .api
            .place_orders(&token, &services.products, count, clients, progress)
            .await;
        stack.check_running(hosts)?;
        check_load(&load, "API")?;
        Ok::<_, anyhow::Error>(ApiResult {
            requests: count,
            seconds: load.elapsed.as_secs_f64(),
            per_second: rate(count, load.elapsed),
            latency: Latency::of(&load.latencies),
            failures: load.failures,
            memory: Memory::of(&stack),
        })
    }
    .await;
    stack.stop();
    result
}

/// What the database and the hosts did per order.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Cost {
    /// Transactions that wrote (they get a transaction id; reads do not):
    /// the `txid_current()` delta over the run.
    pub write_transactions: f64,
    /// Every committed transaction of the database, reads included
    /// (`pg_stat_database.xact_commit`).
    pub commits: f64,
    /// Statements the hosts ran (their `db_statements_total` counters; each
    /// is a round trip, BEGIN/COMMIT not included).
    pub statements: f64,
}

/// The counters behind [`Cost`] at one moment.
struct Counters {
    txid: i64,
    commits: i64,
    statements: f64,
}

impl Counters {
    async fn read(db: &DatabaseConnection, stack: &Stack) -> anyhow::Result<Self> {
        // The statistics of other backends reach pg_stat_database within a
        // second of their last transaction (PostgreSQL 15's shared stats).
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let row = db
            .query_one_raw(Statement::from_string(
                db.get_database_backend(),
                "SELECT txid_current() AS txid, \
                        (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()) AS commits",
            ))
            .await?
            .context("no counters")?;
        Ok(Self {
            txid: row.try_get("", "txid")?,
            commits: row.try_get("", "commits")?,
            statements: stack.counter("db_statements_total").await?,
        })
    }

    /// Per order between `self` and `later` (`later`'s own txid_current()
    /// call is one write transaction, not the system's).
    fn per_order(&self, later: &Self, orders: usize) -> Cost {
        let n = orders.max(1) as f64;
        Cost {
            write_transactions: (later.txid - self.txid - 1) as f64 / n,
            commits: (later.commits - self.commits) as f64 / n,
            statements: (later.statements - self.statements) / n,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct EndToEnd {
    pub orders: usize,
    /// Write transactions, commits and statements per order.
    pub cost: Cost,
    /// From the first order's `created_at` to the last `OrderCompleted`
    /// notification's `created_at`.
    pub seconds: f64,
    pub per_second: f64,
    /// Per order: its `created_at` to its notification's `created_at`.
    pub latency: Latency,
    pub injection_seconds: f64,
    pub memory: Memory,
}

/// Polls `count_sql` (one bigint column `n`) every 100 ms until it reaches
/// `target`, showing progress; fails after `within`.
async fn wait_for_count(
    db: &DatabaseConnection,
    stack: &mut Stack,
    hosts: &Hosts,
    count_sql: &str,
    target: usize,
    within: Duration,
    progress: &ProgressBar,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let row = db
            .query_one_raw(Statement::from_string(db.get_database_backend(), count_sql))
            .await?
            .context("a count query returned no row")?;
        let n: i64 = row.try_get("", "n")?;
        progress.set_position(n as u64);
        if n as usize >= target {
            return Ok(());
        }
        stack.check_running(hosts)?;
        if Instant::now() >= deadline {
            bail!("only {n} of {target} after {within:?} ({count_sql})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Payment delay 0 and success rate 1: `count` orders through the API, from
/// creation to `completed` with the `OrderCompleted` notification written.
pub async fn end_to_end(
    hosts: &Hosts,
    services: &Services,
    label: &str,
    count: usize,
    clients: usize,
    progress: &ProgressBar,
) -> anyhow::Result<EndToEnd> {
    let spec = end_to_end_spec(label);
    let stack = Stack::start(hosts, &services.db, &services.broker, spec).await?;
    measure_end_to_end(stack, hosts, services, count, clients, progress).await
}

/// The settings of the end-to-end scenario (payment delay 0, success 1).
pub fn end_to_end_spec(label: &str) -> StackSpec<'_> {
    StackSpec {
        label,
        runner: true,
        scheduler: true,
        payment_delay_ms: 0,
        success_rate: 1.0,
    }
}

/// The end-to-end measure on a started `stack` (either broker).
pub async fn measure_end_to_end(
    mut stack: Stack,
    hosts: &Hosts,
    services: &Services,
    count: usize,
    clients: usize,
    progress: &ProgressBar,
) -> anyhow::Result<EndToEnd> {
    let result = async {
        let token = stack.api.user_token().await?;
        let before = Counters::read(&services.db.db, &stack).await?;
        let hidden = ProgressBar::hidden();
        let load = stack
            .api
            .place_orders(&token, &services.products, count, clients, &hidden)
            .await;
        check_load(&load, "end to end")?;
        wait_for_count(
            &services.db.db,
            &mut stack,
            hosts,
            "SELECT count(*) AS n FROM notifications WHERE event_type = 'OrderCompleted'",
            count,
            Duration::from_secs(300),
            progress,
        )
        .await?;
        // Every event marked sent too, so the relays' writes are counted.
        wait_for_count(
            &services.db.db,
            &mut stack,
            hosts,
            "SELECT count(*) AS n FROM saga_outbox WHERE sent_at IS NOT NULL",
            2 * count,
            Duration::from_secs(60),
            &ProgressBar::hidden(),
        )
        .await?;
        let after = Counters::read(&services.db.db, &stack).await?;
        let cost = before.per_order(&after, count);
        let db = &services.db.db;
        let rows = db
            .query_all_raw(Statement::from_string(
                db.get_database_backend(),
                "SELECT EXTRACT(EPOCH FROM (n.created_at - o.created_at))::float8 AS s, \
                        EXTRACT(EPOCH FROM (max(n.created_at) OVER () - min(o.created_at) OVER ()))::float8 AS span \
                 FROM orders o JOIN notifications n ON n.order_id = o.id AND n.event_type = 'OrderCompleted' \
                 WHERE o.status = 'completed'",
            ))
            .await?;
        if rows.len() != count {
            bail!("{} completed orders with a notification, expected {count}", rows.len());
        }
        let mut latencies = Vec::with_capacity(rows.len());
        let mut span = 0.0f64;
        for row in &rows {
            let s: f64 = row.try_get("", "s")?;
            latencies.push(Duration::from_secs_f64(s.max(0.0)));
            span = row.try_get("", "span")?;
        }
        Ok::<_, anyhow::Error>(EndToEnd {
            orders: count,
            cost,
            seconds: span,
            per_second: rate(count, Duration::from_secs_f64(span)),
            latency: Latency::of(&latencies),
            injection_seconds: load.elapsed.as_secs_f64(),
            memory: Memory::of(&stack),
        })
    }
    .await;
    stack.stop();
    result
}

#[derive(Clone, Debug, Serialize)]
pub struct Burst {
    pub orders: usize,
    pub payment_delay_ms: u64,
    /// From the first order's `created_at` to the last payment decision's
    /// journal row (`saga_transitions.occurred_at`, trigger `PaymentDecided`).
    pub decided_seconds: f64,
    pub per_second: f64,
    /// How long the API took to accept the whole burst.
    pub injection_seconds: f64,
    pub approved: usize,
    pub declined: usize,
}

/// A burst of `count` orders at the real payment delay and success rate:
/// time until every order has its payment decided (approved or declined).
pub async fn burst(
    hosts: &Hosts,
    services: &Services,
    count: usize,
    clients: usize,
    delay_ms: u64,
    success_rate: f64,
    progress: &ProgressBar,
) -> anyhow::Result<Burst> {
    let spec = StackSpec {
        label: "burst",
        runner: true,
        scheduler: true,
        payment_delay_ms: delay_ms,
        success_rate,
    };
    let mut stack = Stack::start(hosts, &services.db, &services.broker, spec).await?;
    let result = async {
        let token = stack.api.user_token().await?;
        let hidden = ProgressBar::hidden();
        let load = stack
            .api
            .place_orders(&token, &services.products, count, clients, &hidden)
            .await;
        check_load(&load, "burst")?;
        wait_for_count(
            &services.db.db,
            &mut stack,
            hosts,
            "SELECT count(DISTINCT correlation_id) AS n FROM saga_transitions \
             WHERE trigger = 'PaymentDecided' AND outcome = 'applied'",
            count,
            Duration::from_secs(600),
            progress,
        )
        .await?;
        let db = &services.db.db;
        let row = db
            .query_one_raw(Statement::from_string(
                db.get_database_backend(),
                "SELECT EXTRACT(EPOCH FROM ((SELECT max(occurred_at) FROM saga_transitions \
                          WHERE trigger = 'PaymentDecided' AND outcome = 'applied') \
                        - (SELECT min(created_at) FROM orders)))::float8 AS span, \
                        (SELECT count(*) FROM saga_transitions WHERE trigger = 'PaymentDecided' \
                          AND outcome = 'applied' \
                          AND (input->'PaymentDecided'->>'approved')::boolean) AS approved, \
                        (SELECT count(*) FROM saga_transitions WHERE trigger = 'PaymentDecided' \
                          AND outcome = 'applied' \
                          AND NOT (input->'PaymentDecided'->>'approved')::boolean) AS declined",
            ))
            .await?
            .context("no burst summary")?;
        let span: f64 = row.try_get("", "span")?;
        let approved: i64 = row.try_get("", "approved")?;
        let declined: i64 = row.try_get("", "declined")?;
        Ok::<_, anyhow::Error>(Burst {
            orders: count,
            payment_delay_ms: delay_ms,
            decided_seconds: span,
            per_second: rate(count, Duration::from_secs_f64(span)),
            injection_seconds: load.elapsed.as_secs_f64(),
            approved: approved as usize,
            declined: declined as usize,
        })
    }
    .await;
    stack.stop();
    result
}

#[derive(Clone, Debug, Serialize)]
pub struct Sweep {
    pub orders: usize,
    pub seconds: f64,
    pub per_second: f64,
    pub microseconds_per_order: f64,
    pub batch_size: u64,
    pub workers: u32,
}

/// Inserts `count` orders that have been `processing` for an hour, as the
/// engine leaves them after a declined payment: order and item, saga instance
/// (`processing`, its snapshot as data) and the fired payment timer.
async fn insert_stale_orders(
    db: &DatabaseConnection,
    count: usize,
    products: &[i64],
    progress: &ProgressBar,
) -> anyhow::Result<()> {
    let user = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "INSERT INTO users (name, email, password_hash, role, created_at) \
             VALUES ('Bench', 'bench-sweep@example.com', 'not a hash', 'user', now()) RETURNING id",
        ))
        .await?
        .context("the user insert returned nothing")?;
    let user_id: i64 = user.try_get("", "id")?;
    let (first, last) = (products[0], products[products.len() - 1]);
    let chunk = 10_000usize;
    let mut done = 0usize;
    while done < count {
        let n = chunk.min(count - done);
        // Products by the order id, over the bench catalogue's id range.
        let sql = format!(
            "WITH o AS ( \
               INSERT INTO orders (user_id, status, total, created_at, updated_at) \
               SELECT {user_id}, 'processing', 12.50, now() - interval '2 hours', now() - interval '1 hour' \
               FROM generate_series(1, {n}) RETURNING id), \
             i AS ( \
               INSERT INTO order_items (order_id, product_id, quantity, unit_price) \
               SELECT id, {first} + id % ({last} - {first} + 1), 1, 12.50 FROM o RETURNING order_id, product_id), \
             s AS ( \
               INSERT INTO saga_instances (saga_type, correlation_id, state, version, attempts, faulted, \
                 last_error, data, state_entered_at, created_at, updated_at) \
               SELECT 'order', i.order_id::text, 'processing', 2, 0, false, NULL, \
                 jsonb_build_object('order_id', i.order_id, 'user_id', {user_id}, \
                   'user_email', 'bench-sweep@example.com', 'user_name', 'Bench', 'total', '12.50', \
                   'items', jsonb_build_array(jsonb_build_object('product_id', i.product_id, \
                     'product_name', 'bench product', 'quantity', 1, 'unit_price', '12.50'))), \
                 now() - interval '1 hour', now() - interval '2 hours', now() - interval '1 hour' \
               FROM i RETURNING id, correlation_id) \
             INSERT INTO saga_timers (saga_instance_id, correlation_id, timer_kind, due_at, created_at, fired_at) \
             SELECT id, correlation_id, 'payment_due', now() - interval '1 hour', now() - interval '1 hour', \
               now() - interval '1 hour' FROM s"
        );
        db.execute_unprepared(&sql)
            .await
            .context("Failed to insert stale orders")?;
        done += n;
        progress.set_position(done as u64);
    }
    db.execute_unprepared("ANALYZE").await?;
    Ok(())
}

/// The expiration sweep over `count` stale orders, through the engine
/// function the scheduler calls each tick (`sweep_all`, with `workers`
/// transactions at once; progress after each batch).
pub async fn sweep(
    count: usize,
    batch_size: u64,
    workers: u32,
    timeout: chrono::Duration,
    insert_progress: &ProgressBar,
    progress: &ProgressBar,
) -> anyhow::Result<Sweep> {
    let db = TestDatabase::create_with::<migration::Migrator>().await;
    let result = async {
        let products = add_products(&db.db, CATALOGUE).await?;
        insert_stale_orders(&db.db, count, &products, insert_progress).await?;
        let settings = EngineSettings {
            sweep_batch_size: batch_size,
            sweep_workers: workers,
            ..EngineSettings::default()
        };
        let saga = OrderSaga {
            processing_timeout: timeout,
            ..OrderSaga::default()
        };
        let engine = SagaEngine::new(saga, db.db.clone())
            .with_hooks(OrderHooks::new(Arc::new(FixedPayment { approved: false })))
            .with_settings(settings);
        let started = Instant::now();
        let swept = engine
            .sweep_all_with(|batch| progress.inc(batch.timed_out as u64))
            .await?;
        let expired = swept.timed_out;
        let elapsed = started.elapsed();
        if expired != count {
            bail!("the sweep expired {expired} of {count} stale orders");
        }
        Ok::<_, anyhow::Error>(Sweep {
            orders: count,
            seconds: elapsed.as_secs_f64(),
            per_second: rate(count, elapsed),
            microseconds_per_order: elapsed.as_secs_f64() * 1e6 / count.max(1) as f64,
            batch_size,
            workers,
        })
    }
    .await;
    db.drop().await;
    result
}
