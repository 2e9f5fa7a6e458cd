//! Helpers shared by the tests that start host binaries as processes and
//! drive them over HTTP (`e2e.rs`, `monitoring.rs`, `tracing.rs`,
//! `embedded.rs`, `compose.rs`, `faults.rs`).

#![allow(dead_code)] // each test binary uses its own subset

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use saga::testing::{TestBroker, TestDatabase, amqp_url, eventually};
use saga::transport::kafka::{KafkaSettings, KafkaTopology, KafkaTransport};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

/// The environment every host of a test gets: the test's database,
/// exchange and queues, the api on `api_port`, free monitoring ports (tests
/// run in parallel), fast timings (payment 100 ms, processing timeout 2 s,
/// sweep every second, outbox poll 100 ms) and plain text logs. A test
/// appends its overrides: a later entry for the same key wins.
pub fn host_env(tdb: &TestDatabase, broker: &TestBroker, api_port: u16) -> Vec<(String, String)> {
    let mut env = base_env(tdb, api_port);
    env.extend(
        [
            ("APP__RABBITMQ__URL", amqp_url()),
            ("APP__RABBITMQ__EXCHANGE", broker.exchange.clone()),
            ("APP__RABBITMQ__QUEUE_PREFIX", broker.prefix.clone()),
        ]
        .map(|(k, v)| (k.to_owned(), v)),
    );
    env
}

/// Like [`host_env`], on Kafka: `transport.kind=kafka`, the test's topic
/// prefix, and short group timeouts (a join takes about half the session
/// timeout on Tansu).
pub fn host_env_kafka(
    tdb: &TestDatabase,
    topics: &KafkaTopics,
    api_port: u16,
) -> Vec<(String, String)> {
    let mut env = base_env(tdb, api_port);
    env.extend(topics.env());
    env
}

fn base_env(tdb: &TestDatabase, api_port: u16) -> Vec<(String, String)> {
    let config_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configuration");
    [
        ("APP_CONFIG_DIR", config_dir.display().to_string()),
        ("APP__DATABASE__URL", tdb.url.clone()),
        ("APP__API__LISTEN", format!("127.0.0.1:{api_port}")),
        (
            "APP__API__PUBLIC_URL",
            format!("http://127.0.0.1:{api_port}"),
        ),
        (
            "APP__MONITORING__RUNNER_LISTEN",
            format!("127.0.0.1:{}", free_port()),
        ),
        (
            "APP__MONITORING__SCHEDULER_LISTEN",
            format!("127.0.0.1:{}", free_port()),
        ),
        ("APP__PAYMENT__DELAY_MS", "100".into()),
        ("APP__EXPIRATION__PROCESSING_TIMEOUT_SECONDS", "2".into()),
        ("APP__EXPIRATION__SWEEP_INTERVAL_SECONDS", "1".into()),
        ("APP__OUTBOX__POLL_INTERVAL_MS", "100".into()),
        ("RUST_LOG", "info,sqlx=warn,lapin=warn".into()),
        ("NO_COLOR", "1".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// The Kafka broker the tests use: `KAFKA_BOOTSTRAP`, default
/// `127.0.0.1:19092` (`scripts/kafka-broker.sh start`).
pub fn kafka_bootstrap() -> String {
    std::env::var("KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:19092".to_owned())
}

/// A test's own Kafka topics: a fresh prefix, the order saga's topology
/// created before any host starts, deleted by [`KafkaTopics::delete`]
/// (after the hosts are stopped). No broker is a failure, not a skip.
pub struct KafkaTopics {
    pub prefix: String,
    pub settings: KafkaSettings,
    pub transport: KafkaTransport,
    pub topology: KafkaTopology,
}

impl KafkaTopics {
    pub async fn create() -> Self {
        let prefix = format!("t{}", uuid::Uuid::new_v4().simple());
        let settings = KafkaSettings {
            bootstrap_servers: kafka_bootstrap(),
            topic_prefix: prefix.clone(),
            partitions: 3,
            session_timeout: Duration::from_secs(3),
            max_poll_interval: Duration::from_secs(3),
            delivery_timeout: Duration::from_secs(5),
            operation_timeout: Duration::from_secs(10),
            client_id: format!("{prefix}-test"),
            ..KafkaSettings::default()
        };
        let transport = KafkaTransport::connect(settings.clone())
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "no Kafka broker at {} ({e}). Start one with `scripts/kafka-broker.sh start` \
                     (or point KAFKA_BOOTSTRAP at a broker)",
                    kafka_bootstrap()
                )
            });
        let topology = KafkaTopology::new(orders::topology::queues(&prefix), &settings);
        transport.declare(&topology).await.expect("create topics");
        Self {
            prefix,
            settings,
            transport,
            topology,
        }
    }

    /// The hosts' `APP__TRANSPORT__*` and `APP__KAFKA__*` variables.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("APP__TRANSPORT__KIND", "kafka".to_owned()),
            ("APP__KAFKA__BOOTSTRAP_SERVERS", kafka_bootstrap()),
            ("APP__KAFKA__TOPIC_PREFIX", self.prefix.clone()),
            ("APP__KAFKA__SESSION_TIMEOUT_MS", "3000".to_owned()),
            ("APP__KAFKA__MAX_POLL_INTERVAL_MS", "3000".to_owned()),
            ("APP__KAFKA__DELIVERY_TIMEOUT_MS", "5000".to_owned()),
            ("APP__KAFKA__CLIENT_ID", format!("{}-host", self.prefix)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// Deletes the topics and groups (stop every host first).
    pub async fn delete(self) {
        self.transport
            .delete(&self.topology)
            .await
            .expect("delete topics");
        self.transport.close().await;
    }
}

/// The `saga_kafka_consumer_lag` series of a `/metrics` text: (labels, value).
pub fn kafka_lag_series(metrics: &str) -> Vec<(String, f64)> {
    metrics
        .lines()
        .filter_map(|line| line.strip_prefix("saga_kafka_consumer_lag{"))
        .filter_map(|rest| {
            let (labels, value) = rest.split_once("} ")?;
            Some((labels.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

/// Host processes started by a test, each logging to its own file, killed
/// on drop.
pub struct Processes {
    children: Vec<(String, Child)>,
    pub logs: PathBuf,
}

impl Processes {
    pub fn new(label: &str) -> Self {
        let logs = std::env::temp_dir().join(format!(
            "order-saga-{label}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&logs).expect("log dir");
        Self {
            children: Vec::new(),
            logs,
        }
    }

    /// Starts `exe args...` with exactly `env` on top of a cleared
    /// environment (plus `PATH`), logging to `<name>.log`.
    /// A restarted process appends to the same log.
    pub fn spawn(&mut self, name: &str, exe: &str, args: &[String], env: &[(String, String)]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.join(format!("{name}.log")))
            .expect("log file");
        let err = log.try_clone().expect("log file clone");
        let mut command = Command::new(exe);
        command
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .kill_on_drop(true);
        for (k, v) in env {
            command.env(k, v);
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {exe}: {e}"));
        self.children.push((name.to_owned(), child));
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.logs.join(format!("{name}.log"))).unwrap_or_default()
    }

    fn all_logs(&self) -> String {
        self.children
            .iter()
            .map(|(name, _)| format!("--- {name} ---\n{}", self.log(name)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Panics, with every process's log, if one of them has exited.
    pub fn assert_running(&mut self) {
        let mut dead = Vec::new();
        for (name, child) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                dead.push(format!("{name} exited with {status}"));
            }
        }
        if !dead.is_empty() {
            panic!("{}\n{}", dead.join("; "), self.all_logs());
        }
    }

    /// Panics with `what` and every log.
    pub fn fail(&self, what: &str) -> ! {
        panic!("{what}\n{}", self.all_logs());
    }

    /// Sends SIGTERM to `name` and waits (at most 30 s) for it to exit.
    pub async fn terminate(&mut self, name: &str) -> std::process::ExitStatus {
        let index = self
            .children
            .iter()
            .position(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no process named {name}"));
        let (_, mut child) = self.children.remove(index);
        let pid = child.id().expect("running");
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill");
        assert!(sent.success());
        tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .unwrap_or_else(|_| self.fail(&format!("{name} still running 30 s after SIGTERM")))
            .expect("exit status")
    }

    /// Kills `name` with SIGKILL (no graceful shutdown) and waits for it to
    /// be gone; it can be spawned again under the same name (its log is
    /// appended to).
    pub async fn kill(&mut self, name: &str) {
        let index = self
            .children
            .iter()
            .position(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no process named {name}"));
        let (_, mut child) = self.children.remove(index);
        child.start_kill().expect("SIGKILL sent");
        tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .unwrap_or_else(|_| self.fail(&format!("{name} still running 30 s after SIGKILL")))
            .expect("exit status");
    }

    /// Kills every process (SIGKILL) and waits for it.
    pub async fn stop(mut self) {
        for (_, child) in &mut self.children {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
        let _ = std::fs::remove_dir_all(&self.logs);
    }
}

/// An HTTP client for one API base URL.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    http: reqwest::Client,
}

impl Api {
    pub fn new(base: impl Into<String>) -> Self {
        Self {
            base: base.into(),
            http: reqwest::Client::new(),
        }
    }

    /// Waits (with a deadline) until `GET /health` answers 200.
    pub async fn wait_healthy(&self, within: Duration) {
        let health = format!("{}/health", self.base);
        let http = self.http.clone();
        eventually(within, "the api to answer /health", || {
            let http = http.clone();
            let health = health.clone();
            async move {
                let r = http.get(&health).send().await.ok()?;
                r.status().is_success().then_some(())
            }
        })
        .await;
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
        let mut req = self.http.post(format!("{}{path}", self.base)).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.expect("request sent");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// `POST path` with an optional `Idempotency-Key`, giving up after
    /// `timeout`; transport errors are returned, not panicked on (for
    /// clients that retry while a server is down).
    pub async fn try_post(
        &self,
        path: &str,
        token: &str,
        idempotency_key: Option<&str>,
        body: &Value,
        timeout: Duration,
    ) -> Result<(u16, Value), reqwest::Error> {
        let mut req = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(token)
            .timeout(timeout)
            .json(body);
        if let Some(key) = idempotency_key {
            req = req.header("idempotency-key", key);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        Ok((status, resp.json().await.unwrap_or(Value::Null)))
    }

    pub async fn get(&self, path: &str, token: &str) -> (u16, Value) {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(token)
            .send()
            .await
            .expect("request sent");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Registers a fresh user and logs in; returns the token and user id.
    pub async fn register_and_login(&self) -> (String, i64) {
        let email = format!("it-{}@example.com", uuid::Uuid::new_v4().simple());
        let (status, user) = self
            .post(
                "/api/users",
                None,
                json!({"name": "Tester", "email": email, "password": "test-password"}),
            )
            .await;
        assert_eq!(status, 201, "register: {user}");
        let (status, login) = self
            .post(
                "/api/auth/login",
                None,
                json!({"email": email, "password": "test-password"}),
            )
            .await;
        assert_eq!(status, 200, "login: {login}");
        let token = login["token"].as_str().expect("token").to_owned();
        (token, user["id"].as_i64().expect("user id"))
    }

    /// Places `n` orders of seeded products; returns their ids.
    pub async fn place_orders(&self, token: &str, user_id: i64, n: usize) -> Vec<i64> {
        let mut ids = Vec::new();
        for i in 0..n {
            let (status, order) = self
                .post(
                    "/api/orders",
                    Some(token),
                    json!({"items": [{"product_id": 1 + (i % 3) as i64, "quantity": 1 + (i % 2) as i64}]}),
                )
                .await;
            assert_eq!(status, 201, "create order: {order}");
            assert_eq!(order["status"], "pending");
            assert_eq!(order["user_id"], user_id);
            ids.push(order["id"].as_i64().expect("order id"));
        }
        ids
    }

    /// Polls each order (deadline `within` for all) until its status is `want`;
    /// panics with the processes' logs otherwise.
    pub async fn wait_for_status(
        &self,
        processes: &mut Processes,
        token: &str,
        ids: &[i64],
        want: &str,
        within: Duration,
    ) {
        processes.assert_running();
        let deadline = tokio::time::Instant::now() + within;
        for id in ids {
            let path = format!("/api/orders/{id}");
            loop {
                let (_, order) = self.get(&path, token).await;
                if order["status"] == want {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    processes.assert_running();
                    processes.fail(&format!("order {id} did not become {want}: {order}"));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        processes.assert_running();
    }

    /// Waits until every order has exactly one `event` notification (through
    /// the API) with `is_email_sent == email_sent`, and none of `absent`.
    pub async fn assert_one_notification_each(
        &self,
        token: &str,
        ids: &[i64],
        event: &str,
        email_sent: bool,
        absent: &str,
    ) {
        for id in ids {
            let path = format!("/api/orders/{id}/notifications");
            let notes = eventually(Duration::from_secs(30), "the notification", || async {
                let (status, notes) = self.get(&path, token).await;
                assert_eq!(status, 200, "{notes}");
                let notes = notes.as_array().expect("array").clone();
                notes
                    .iter()
                    .any(|n| n["event_type"] == event)
                    .then_some(notes)
            })
            .await;
            let matching: Vec<_> = notes.iter().filter(|n| n["event_type"] == event).collect();
            assert_eq!(matching.len(), 1, "order {id}: {notes:?}");
            assert_eq!(matching[0]["is_email_sent"], email_sent, "order {id}");
            assert!(
                notes.iter().all(|n| n["event_type"] != absent),
                "order {id} has {absent}: {notes:?}"
            );
        }
    }
}
