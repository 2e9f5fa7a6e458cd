//! Helpers shared by the tests that start host binaries as processes and
//! drive them over HTTP (`e2e.rs`, `monitoring.rs`, `tracing.rs`,
//! `embedded.rs`, `compose.rs`, `faults.rs`).

#![allow(dead_code)] // each test binary uses its own subset

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use saga::testing::{TestBroker, TestDatabase, amqp_url, eventually};
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
    let config_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configuration");
    [
        ("APP_CONFIG_DIR", config_dir.display().to_string()),
        ("APP__DATABASE__URL", tdb.url.clone()),
        ("APP__RABBITMQ__URL", amqp_url()),
        ("APP__RABBITMQ__EXCHANGE", broker.exchange.clone()),
        ("APP__RABBITMQ__QUEUE_PREFIX", broker.prefix.clone()),
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
