//! The fault suite's machinery: the private servers it may restart, the
//! hosts as processes, a load of clients that retry with an
//! Idempotency-Key, progress lines, and gathering what the checker needs.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use saga::testing::{TestBroker, TestDatabase, amqp_url, database_url};
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};
use serde_json::json;

use super::checker::Observations;
use crate::common::{Api, KafkaTopics, Processes, free_port};

/// The private PostgreSQL and RabbitMQ that `scripts/fault-suite.sh` starts,
/// and how to disturb them. Faults restart servers, so the suite never runs
/// against the shared ones.
pub struct Servers {
    /// A shell command that restarts the private PostgreSQL.
    pub restart_postgres: String,
    /// `rabbitmqctl` aimed at the private node (e.g. `rabbitmqctl -n faults@localhost`).
    pub rabbitmqctl: String,
    /// Orders per fault (`FAULTS_ORDERS`, default 1,000).
    pub orders: usize,
    /// The hosts run on Kafka (`FAULTS_KAFKA_BOOTSTRAP`, a private broker
    /// that `scripts/fault-suite.sh --kafka` starts) instead of RabbitMQ.
    pub kafka: bool,
}

fn required(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: the fault suite restarts PostgreSQL and RabbitMQ, so it only \
             runs against the private servers that scripts/fault-suite.sh starts; run \
             scripts/fault-suite.sh (or set FAULTS_DATABASE_URL, FAULTS_AMQP_URL, \
             FAULTS_RESTART_POSTGRES, FAULTS_RABBITMQCTL, and DATABASE_URL/AMQP_URL to the \
             same servers)"
        )
    })
}

impl Servers {
    /// Reads the environment set by `scripts/fault-suite.sh`; panics with
    /// what is missing otherwise.
    pub fn from_env() -> Self {
        let orders = std::env::var("FAULTS_ORDERS")
            .ok()
            .map(|v| {
                v.parse::<usize>()
                    .ok()
                    .filter(|n| *n > 0)
                    .unwrap_or_else(|| panic!("FAULTS_ORDERS must be a positive number, got {v:?}"))
            })
            .unwrap_or(1000);
        if let Ok(kafka) = std::env::var("FAULTS_KAFKA_BOOTSTRAP") {
            let db = required("FAULTS_DATABASE_URL");
            assert_eq!(
                database_url(),
                db,
                "DATABASE_URL must equal FAULTS_DATABASE_URL (the private server)"
            );
            assert_eq!(
                crate::common::kafka_bootstrap(),
                kafka,
                "KAFKA_BOOTSTRAP must equal FAULTS_KAFKA_BOOTSTRAP (the private broker)"
            );
            assert!(
                !db.contains(":5432/") && !kafka.ends_with(":19092"),
                "FAULTS_DATABASE_URL/FAULTS_KAFKA_BOOTSTRAP point at the shared servers; the \
                 fault suite needs private ones (scripts/fault-suite.sh --kafka)"
            );
            return Self {
                restart_postgres: required("FAULTS_RESTART_POSTGRES"),
                rabbitmqctl: String::new(),
                orders,
                kafka: true,
            };
        }
        let db = required("FAULTS_DATABASE_URL");
        let amqp = required("FAULTS_AMQP_URL");
        // The test database and broker helpers read DATABASE_URL/AMQP_URL:
        // they must point at the private servers too.
        assert_eq!(
            database_url(),
            db,
            "DATABASE_URL must equal FAULTS_DATABASE_URL (the private server)"
        );
        assert_eq!(
            amqp_url(),
            amqp,
            "AMQP_URL must equal FAULTS_AMQP_URL (the private node)"
        );
        // Never restart the shared servers other tests are using.
        assert!(
            !db.contains(":5432/") && !amqp.contains(":5672/"),
            "FAULTS_DATABASE_URL/FAULTS_AMQP_URL point at the shared servers; the fault \
             suite needs private ones (scripts/fault-suite.sh)"
        );
        let rabbitmqctl = required("FAULTS_RABBITMQCTL");
        assert!(
            rabbitmqctl.contains(" -n "),
            "FAULTS_RABBITMQCTL must name the private node with -n, got {rabbitmqctl:?}"
        );
        Self {
            restart_postgres: required("FAULTS_RESTART_POSTGRES"),
            rabbitmqctl,
            orders,
            kafka: false,
        }
    }

    /// How many faults a test injects at most: one per 200 orders, 5 to 50.
    pub fn faults(&self) -> usize {
        (self.orders / 200).clamp(5, 50)
    }

    /// `rabbitmqctl <args>` on the private node; panics if it fails.
    pub async fn rabbitmqctl(&self, args: &str) {
        sh(&format!("{} {args}", self.rabbitmqctl)).await;
    }

    /// Restarts the private PostgreSQL; panics if that fails.
    pub async fn restart_postgres(&self) {
        sh(&self.restart_postgres).await;
    }
}

/// Runs `command` with `sh -c`; panics with its output if it fails.
async fn sh(command: &str) {
    let out = tokio::process::Command::new("sh")
        .args(["-c", command])
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed with {}: {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// api, runners and schedulers as processes on a database and broker
/// topology of the test's own, with fast timings.
pub struct Stack {
    pub procs: Processes,
    pub api: Api,
    pub tdb: TestDatabase,
    /// RabbitMQ runs: the test's exchange and queues.
    pub broker: Option<TestBroker>,
    /// Kafka runs (`FAULTS_KAFKA_BOOTSTRAP`): the test's topics.
    pub kafka: Option<KafkaTopics>,
    env: Vec<(String, String)>,
    label: String,
}

const UP_WITHIN: Duration = Duration::from_secs(60);

impl Stack {
    /// Starts the api, then `runners` runners (`runner-1`...) and
    /// `schedulers` schedulers (`scheduler-1`...).
    pub async fn start(label: &str, runners: usize, schedulers: usize) -> Stack {
        let tdb = TestDatabase::create_with::<migration::Migrator>().await;
        // Stock is not what is tested: enough for any run.
        tdb.db
            .execute_unprepared("UPDATE products SET stock = 1000000000")
            .await
            .expect("stock");
        let (broker, kafka) = if std::env::var("FAULTS_KAFKA_BOOTSTRAP").is_ok() {
            (None, Some(KafkaTopics::create().await))
        } else {
            (
                Some(TestBroker::create(orders::topology::queues).await),
                None,
            )
        };
        let port = free_port();
        let base = format!("http://127.0.0.1:{port}");
        let config_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configuration");
        let broker_env: Vec<(String, String)> = match (&broker, &kafka) {
            (Some(broker), _) => [
                ("APP__RABBITMQ__URL", amqp_url()),
                ("APP__RABBITMQ__EXCHANGE", broker.exchange.clone()),
                ("APP__RABBITMQ__QUEUE_PREFIX", broker.prefix.clone()),
                ("APP__RABBITMQ__RECONNECT_MAX_BACKOFF_MS", "1000".into()),
            ]
            .map(|(k, v)| (k.to_owned(), v))
            .into(),
            (None, Some(kafka)) => kafka.env(),
            (None, None) => Vec::new(),
        };
        let env = [
            ("APP_CONFIG_DIR", config_dir.display().to_string()),
            ("APP__DATABASE__URL", tdb.url.clone()),
            ("APP__DATABASE__ACQUIRE_TIMEOUT_SECONDS", "2".into()),
            ("APP__API__LISTEN", format!("127.0.0.1:{port}")),
            ("APP__API__PUBLIC_URL", base.clone()),
            // Many runners and schedulers at once: each binds its own
            // ephemeral monitoring port instead of the default one.
            ("APP__MONITORING__RUNNER_LISTEN", "127.0.0.1:0".into()),
            ("APP__MONITORING__SCHEDULER_LISTEN", "127.0.0.1:0".into()),
            ("APP__AUTH__TOKEN_TTL_SECONDS", "86400".into()),
            // Both outcomes during the run: a short payment, half of them
            // declined and then expired by the sweep.
            ("APP__PAYMENT__DELAY_MS", "200".into()),
            ("APP__PAYMENT__SUCCESS_RATE", "0.5".into()),
            ("APP__EXPIRATION__PROCESSING_TIMEOUT_SECONDS", "2".into()),
            ("APP__EXPIRATION__SWEEP_INTERVAL_SECONDS", "1".into()),
            ("APP__OUTBOX__POLL_INTERVAL_MS", "100".into()),
            ("APP__RETRY__MAX_BACKOFF_MS", "1000".into()),
            ("RUST_LOG", "info,sqlx=warn,lapin=warn".into()),
            ("NO_COLOR", "1".into()),
        ];
        let mut stack = Stack {
            procs: Processes::new(&format!("faults-{label}")),
            api: Api::new(base),
            tdb,
            broker,
            kafka,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .chain(broker_env)
                .collect(),
            label: label.to_owned(),
        };
        stack.spawn("api");
        stack.api.wait_healthy(UP_WITHIN).await;
        for i in 1..=runners {
            stack.spawn(&format!("runner-{i}"));
        }
        for i in 1..=schedulers {
            stack.spawn(&format!("scheduler-{i}"));
        }
        stack
    }

    /// Starts (or restarts) host `name`: `api`, `runner-N` or `scheduler-N`.
    pub fn spawn(&mut self, name: &str) {
        let exe = match name.split('-').next() {
            Some("api") => env!("CARGO_BIN_EXE_api"),
            Some("runner") => env!("CARGO_BIN_EXE_runner"),
            Some("scheduler") => env!("CARGO_BIN_EXE_scheduler"),
            _ => panic!("unknown host {name}"),
        };
        self.procs.spawn(name, exe, &[], &self.env);
    }

    /// A gauge read from the test's database, `None` while it is unreachable.
    pub async fn count(&self, sql: &str) -> Option<i64> {
        count(&self.tdb.db, sql).await
    }

    /// How often `needle` occurs in host `name`'s log.
    pub fn log_count(&self, name: &str, needle: &str) -> usize {
        self.procs.log(name).matches(needle).count()
    }

    /// Every runner's log (killed runners' lines included: a restarted
    /// process appends to its log).
    fn runner_logs(&self) -> String {
        let mut all = String::new();
        if let Ok(dir) = std::fs::read_dir(&self.procs.logs) {
            for entry in dir.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with("runner") && name.ends_with(".log") {
                    all.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
                }
            }
        }
        all
    }

    /// Waits (at most `within`) until every order is decided and has its
    /// terminal notification, printing progress; returns whether it got
    /// there (if not, the checker says which orders are lost).
    pub async fn wait_until_settled(&self, acknowledged: usize, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let mut last_line = Instant::now();
        loop {
            let open = self.count(OPEN_SQL).await;
            let decided = self.count(DECIDED_SQL).await;
            if open == Some(0) && decided.is_some_and(|d| d >= acknowledged as i64) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            if last_line.elapsed() >= PROGRESS_EVERY {
                last_line = Instant::now();
                eprintln!(
                    "[{}] settling: {} of {acknowledged} decided with their notification",
                    self.label,
                    show(decided)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Gathers everything the checker looks at.
    pub async fn observe(&self, acknowledged: Vec<i64>) -> Observations {
        let db = &self.tdb.db;
        let orders = rows(db, "SELECT id, status FROM orders")
            .await
            .into_iter()
            .map(|(id, s, _)| (id, s))
            .collect();
        let transitions = rows(
            db,
            "SELECT correlation_id::bigint, trigger, to_state FROM saga_transitions \
             WHERE outcome = 'applied'",
        )
        .await;
        let events = rows(
            db,
            "SELECT correlation_id::bigint, message_type FROM saga_outbox",
        )
        .await
        .into_iter()
        .map(|(id, s, _)| (id, s))
        .collect();
        let notifications = rows(db, "SELECT order_id, event_type FROM notifications")
            .await
            .into_iter()
            .map(|(id, s, _)| (id, s))
            .collect();
        Observations {
            acknowledged,
            orders,
            transitions,
            events,
            notifications,
            emails: emails_in(&self.runner_logs()),
        }
    }

    /// Kills every host, deletes the topology and drops the database.
    pub async fn stop(self) {
        self.procs.stop().await;
        if let Some(broker) = self.broker {
            broker.delete().await;
        }
        if let Some(kafka) = self.kafka {
            kafka.delete().await;
        }
        self.tdb.drop().await;
    }
}

/// Orders not yet decided, or decided without their terminal notification.
const OPEN_SQL: &str = "SELECT count(*) FROM orders o WHERE o.status NOT IN ('completed', 'expired') \
     OR NOT EXISTS (SELECT 1 FROM notifications n WHERE n.order_id = o.id AND n.event_type = \
     CASE o.status WHEN 'completed' THEN 'OrderCompleted' ELSE 'OrderExpired' END)";
/// Orders decided.
pub const DECIDED_SQL: &str =
    "SELECT count(*) FROM orders WHERE status IN ('completed', 'expired')";
/// 1 once order `id` was handled by both consumers: the saga consumer
/// (its `OrderCreated` journal row) and the notification consumer (its
/// `OrderCreated` notification); 0 before.
pub fn consumed_by_both(id: i64) -> String {
    format!(
        "SELECT (SELECT count(*) FROM saga_transitions WHERE trigger = 'OrderCreated' \
         AND outcome = 'applied' AND correlation_id = '{id}') \
         * (SELECT count(*) FROM notifications WHERE order_id = {id} \
         AND event_type = 'OrderCreated')"
    )
}

const PROGRESS_EVERY: Duration = Duration::from_secs(5);

async fn count(db: &DatabaseConnection, sql: &str) -> Option<i64> {
    let row = db
        .query_one_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .ok()??;
    row.try_get_by_index::<i64>(0).ok()
}

fn show(n: Option<i64>) -> String {
    n.map_or_else(|| "? (database unreachable)".to_owned(), |n| n.to_string())
}

/// Rows of (bigint, text[, text]); panics if the query fails (the servers
/// are back by the time the checker runs).
async fn rows(db: &DatabaseConnection, sql: &str) -> Vec<(i64, String, String)> {
    db.query_all_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .into_iter()
        .map(|row| {
            let id: i64 = row.try_get_by_index(0).expect("id");
            let a: String = row.try_get_by_index(1).expect("text");
            let b: String = row.try_get_by_index(2).unwrap_or_default();
            (id, a, b)
        })
        .collect()
}

/// The order id of every fake e-mail line in `log`.
pub fn emails_in(log: &str) -> Vec<i64> {
    const MARK: &str = "Your order #";
    log.lines()
        .filter(|l| l.contains("FAKE E-MAIL"))
        .filter_map(|l| {
            let rest = &l[l.find(MARK)? + MARK.len()..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect()
}

/// Clients placing orders with an Idempotency-Key each, retrying every
/// failure (refused connection, timeout, 5xx, 409 "being processed") until
/// they get a 201, at most `rate` orders per second overall.
pub struct Load {
    /// Order ids answered with 201, one per key.
    pub acknowledged: Arc<Mutex<Vec<i64>>>,
    /// Keys answered so far.
    pub created: Arc<AtomicUsize>,
    /// Requests that had to be retried.
    pub retries: Arc<AtomicUsize>,
    done: Arc<AtomicBool>,
    api: Api,
    token: String,
    run: String,
    clients: Vec<tokio::task::JoinHandle<()>>,
    progress: tokio::task::JoinHandle<()>,
    pub orders: usize,
    started: Instant,
}

/// How long one client keeps retrying one order before the test fails.
const CLIENT_PATIENCE: Duration = Duration::from_secs(120);

impl Load {
    /// Registers a user and starts `clients` clients for `orders` orders,
    /// plus a progress line every few seconds.
    pub async fn start(stack: &Stack, orders: usize, clients: usize, rate: f64) -> Load {
        let (token, _) = stack.api.register_and_login().await;
        let next = Arc::new(AtomicUsize::new(0));
        let acknowledged = Arc::new(Mutex::new(Vec::with_capacity(orders)));
        let created = Arc::new(AtomicUsize::new(0));
        let retries = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let run = uuid::Uuid::new_v4().simple().to_string();
        let mut handles = Vec::new();
        for _ in 0..clients {
            let (api, token, run) = (stack.api.clone(), token.clone(), run.clone());
            let (next, acknowledged, created, retries) = (
                next.clone(),
                acknowledged.clone(),
                created.clone(),
                retries.clone(),
            );
            handles.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= orders {
                        return;
                    }
                    // Pace: order i starts no earlier than i / rate seconds in.
                    let due = started + Duration::from_secs_f64(i as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                    let id = place(&api, &token, &format!("{run}-{i}"), i, &retries).await;
                    acknowledged.lock().expect("acknowledged").push(id);
                    created.fetch_add(1, Ordering::SeqCst);
                }
            }));
        }
        let progress = {
            let (db, created, done, label) = (
                stack.tdb.db.clone(),
                created.clone(),
                done.clone(),
                stack.label.clone(),
            );
            tokio::spawn(async move {
                while !done.load(Ordering::SeqCst) {
                    tokio::time::sleep(PROGRESS_EVERY).await;
                    eprintln!(
                        "[{label}] {:>5.0} s: created {} of {orders}, decided {}",
                        started.elapsed().as_secs_f64(),
                        created.load(Ordering::SeqCst),
                        show(count(&db, DECIDED_SQL).await)
                    );
                }
            })
        };
        Load {
            acknowledged,
            created,
            retries,
            done,
            api: stack.api.clone(),
            token,
            run,
            clients: handles,
            progress,
            orders,
            started,
        }
    }

    /// Places one more order now, like any client (retrying until a 201),
    /// and counts it as acknowledged; returns its id.
    pub async fn probe(&self) -> i64 {
        let key = format!("{}-probe-{}", self.run, uuid::Uuid::new_v4().simple());
        let id = place(&self.api, &self.token, &key, 0, &self.retries).await;
        self.acknowledged.lock().expect("acknowledged").push(id);
        id
    }

    pub fn created(&self) -> usize {
        self.created.load(Ordering::SeqCst)
    }

    pub fn finished(&self) -> bool {
        self.created() >= self.orders || self.clients.iter().all(|c| c.is_finished())
    }

    /// Waits until created >= `n` (or the load is over); false if over first.
    pub async fn reached(&self, n: usize) -> bool {
        loop {
            if self.created() >= n {
                return true;
            }
            if self.finished() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for every client; panics if one did (it gave up on an order).
    pub async fn finish(mut self) -> (Vec<i64>, usize, Duration) {
        for client in self.clients.drain(..) {
            client
                .await
                .expect("a client gave up (see its panic above)");
        }
        self.done.store(true, Ordering::SeqCst);
        self.progress.abort();
        let acknowledged = self.acknowledged.lock().expect("acknowledged").clone();
        (
            acknowledged,
            self.retries.load(Ordering::SeqCst),
            self.started.elapsed(),
        )
    }
}

/// One client request, retried with the same key until it gets a 201.
async fn place(api: &Api, token: &str, key: &str, i: usize, retries: &AtomicUsize) -> i64 {
    let body = json!({"items": [{"product_id": 1 + (i % 5) as i64, "quantity": 1}]});
    let deadline = Instant::now() + CLIENT_PATIENCE;
    let mut backoff = Duration::from_millis(20);
    loop {
        let last = match api
            .try_post(
                "/api/orders",
                token,
                Some(key),
                &body,
                Duration::from_secs(15),
            )
            .await
        {
            Ok((201, order)) => return order["id"].as_i64().expect("order id"),
            Ok((status, problem))
                if status == 409
                    && problem["type"] == "urn:order-saga:problem:idempotency-key-reused" =>
            {
                panic!("key {key} was reported reused with a different body: {problem}")
            }
            Ok((status, problem)) if status < 500 && status != 409 && status != 429 => {
                panic!("order with key {key} refused with {status}: {problem}")
            }
            Ok((status, problem)) => format!("{status} {problem}"),
            Err(e) => e.to_string(),
        };
        retries.fetch_add(1, Ordering::Relaxed);
        assert!(
            Instant::now() < deadline,
            "order with key {key} got no 201 within {CLIENT_PATIENCE:?}; last answer: {last}"
        );
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

/// Polls the gauge `sql` until it exceeds `from` (any reading, if `from`
/// is `None`); returns how long that took, or `None` after `within`.
pub async fn time_until_moved(
    stack: &Stack,
    sql: &str,
    from: Option<i64>,
    within: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if let Some(now) = stack.count(sql).await
            && from.is_none_or(|f| now > f)
        {
            return Some(start.elapsed());
        }
        if start.elapsed() >= within {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// What one fault test did, for its summary line.
#[derive(Default)]
pub struct Faults {
    /// What was injected, by kind: how many times.
    pub injected: BTreeMap<&'static str, usize>,
    /// Recovery times, by what was measured.
    pub recoveries: BTreeMap<&'static str, Vec<Duration>>,
}

impl Faults {
    pub fn injected(&mut self, what: &'static str) {
        *self.injected.entry(what).or_default() += 1;
    }

    pub fn recovered(&mut self, what: &'static str, took: Duration) {
        self.recoveries.entry(what).or_default().push(took);
    }

    pub fn total(&self) -> usize {
        self.injected.values().sum()
    }

    /// The slowest recovery of `what`.
    pub fn max(&self, what: &str) -> Option<Duration> {
        self.recoveries.get(what)?.iter().max().copied()
    }

    pub fn summary(&self) -> String {
        let injected: Vec<String> = self
            .injected
            .iter()
            .map(|(k, n)| format!("{k} x{n}"))
            .collect();
        let recoveries: Vec<String> = self
            .recoveries
            .iter()
            .map(|(k, v)| {
                let mut v = v.clone();
                v.sort();
                format!(
                    "{k}: median {:.2} s, max {:.2} s (n={})",
                    v[v.len() / 2].as_secs_f64(),
                    v[v.len() - 1].as_secs_f64(),
                    v.len()
                )
            })
            .collect();
        format!(
            "faults injected: {}; recovery: {}",
            if injected.is_empty() {
                "none".to_owned()
            } else {
                injected.join(", ")
            },
            if recoveries.is_empty() {
                "n/a".to_owned()
            } else {
                recoveries.join("; ")
            }
        )
    }
}
