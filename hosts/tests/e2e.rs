//! End to end: the real `api`, `runner` and `scheduler` binaries as separate
//! processes, on this machine's PostgreSQL and RabbitMQ (a database, exchange
//! and queues of the test's own), with fast timings set through `APP__...`
//! environment overrides, driven over HTTP.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use entity::notifications;
use saga::testing::{TcpProxy, TestBroker, TestDatabase, amqp_url, eventually};
use sea_orm::ConnectionTrait;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

const ORDERS: usize = 20;

struct Stack {
    children: Vec<(String, Child)>,
    base: String,
    logs: PathBuf,
    http: reqwest::Client,
    env: Vec<(&'static str, String)>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

impl Stack {
    async fn start(tdb: &TestDatabase, broker: &TestBroker, success_rate: &str) -> Stack {
        Self::start_with(tdb, broker, success_rate, &[]).await
    }

    /// Like [`Stack::start`], with `runner_env` overriding the runner's
    /// environment (e.g. its broker URL pointing at a proxy).
    async fn start_with(
        tdb: &TestDatabase,
        broker: &TestBroker,
        success_rate: &str,
        runner_env: &[(&'static str, String)],
    ) -> Stack {
        let port = free_port();
        let base = format!("http://127.0.0.1:{port}");
        let logs = std::env::temp_dir().join(format!("order-saga-e2e-{}", tdb.name));
        std::fs::create_dir_all(&logs).expect("log dir");
        let config_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configuration");
        let env: Vec<(&'static str, String)> = vec![
            ("APP_CONFIG_DIR", config_dir.display().to_string()),
            ("APP__DATABASE__URL", tdb.url.clone()),
            ("APP__RABBITMQ__URL", amqp_url()),
            ("APP__RABBITMQ__EXCHANGE", broker.exchange.clone()),
            ("APP__RABBITMQ__QUEUE_PREFIX", broker.prefix.clone()),
            ("APP__API__LISTEN", format!("127.0.0.1:{port}")),
            ("APP__API__PUBLIC_URL", base.clone()),
            ("APP__PAYMENT__DELAY_MS", "100".into()),
            ("APP__PAYMENT__SUCCESS_RATE", success_rate.into()),
            ("APP__EXPIRATION__PROCESSING_TIMEOUT_SECONDS", "2".into()),
            ("APP__EXPIRATION__SWEEP_INTERVAL_SECONDS", "1".into()),
            ("APP__OUTBOX__POLL_INTERVAL_MS", "100".into()),
            ("RUST_LOG", "info,sqlx=warn,lapin=warn".into()),
            ("NO_COLOR", "1".into()),
        ];
        let mut stack = Stack {
            children: Vec::new(),
            base,
            logs,
            http: reqwest::Client::new(),
            env: env.clone(),
        };
        stack.spawn("api", env!("CARGO_BIN_EXE_api"), &env);
        // The api applies migrations and seeds; the others wait for the schema.
        let health = format!("{}/health", stack.base);
        let http = stack.http.clone();
        eventually(Duration::from_secs(60), "the api to answer /health", || {
            let http = http.clone();
            let health = health.clone();
            async move {
                let r = http.get(&health).send().await.ok()?;
                r.status().is_success().then_some(())
            }
        })
        .await;
        stack.spawn_runner(runner_env);
        stack.spawn("scheduler", env!("CARGO_BIN_EXE_scheduler"), &env);
        stack
    }

    /// Starts (or restarts) the runner with the stack's environment plus
    /// `overrides`; its log is appended to.
    fn spawn_runner(&mut self, overrides: &[(&'static str, String)]) {
        let mut env = self.env.clone();
        env.extend(overrides.iter().cloned());
        self.spawn("runner", env!("CARGO_BIN_EXE_runner"), &env);
    }

    /// Sends SIGTERM to a host and waits for it to exit.
    async fn terminate(&mut self, name: &str) -> std::process::ExitStatus {
        let index = self
            .children
            .iter()
            .position(|(n, _)| n == name)
            .expect("a host of that name");
        let (_, mut child) = self.children.remove(index);
        let pid = child.id().expect("running");
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill");
        assert!(sent.success());
        tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .expect("exits within 30 s of SIGTERM")
            .expect("exit status")
    }

    fn spawn(&mut self, name: &str, exe: &str, env: &[(&str, String)]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.join(format!("{name}.log")))
            .expect("log file");
        let err = log.try_clone().expect("log file clone");
        let mut command = Command::new(exe);
        command
            .env_remove("RUST_BACKTRACE")
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

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.logs.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Panics (with the hosts' logs) if a host has exited.
    fn assert_running(&mut self) {
        let mut dead = Vec::new();
        for (name, child) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                dead.push(format!("{name} exited with {status}"));
            }
        }
        if !dead.is_empty() {
            panic!(
                "{}\n--- api ---\n{}\n--- runner ---\n{}\n--- scheduler ---\n{}",
                dead.join("; "),
                self.log("api"),
                self.log("runner"),
                self.log("scheduler")
            );
        }
    }

    async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
        let mut req = self.http.post(format!("{}{path}", self.base)).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.expect("request sent");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str, token: &str) -> (u16, Value) {
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

    async fn stop(mut self) {
        for (_, child) in &mut self.children {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
        let _ = std::fs::remove_dir_all(&self.logs);
    }
}

/// Registers, logs in and places `ORDERS` orders; returns the token and ids.
async fn place_orders(stack: &Stack) -> (String, Vec<i64>) {
    let token = sign_up(stack).await;
    let ids = more_orders(stack, &token, ORDERS).await;
    (token, ids)
}

/// Registers and logs in a new user; returns the token.
async fn sign_up(stack: &Stack) -> String {
    let email = format!("e2e-{}@example.com", uuid::Uuid::new_v4().simple());
    let (status, user) = stack
        .post(
            "/api/users",
            None,
            json!({"name": "E2E", "email": email, "password": "e2e-password"}),
        )
        .await;
    assert_eq!(status, 201, "register: {user}");
    let (status, login) = stack
        .post(
            "/api/auth/login",
            None,
            json!({"email": email, "password": "e2e-password"}),
        )
        .await;
    assert_eq!(status, 200, "login: {login}");
    login["token"].as_str().expect("token").to_owned()
}

/// Places `count` orders as the token's user.
async fn more_orders(stack: &Stack, token: &str, count: usize) -> Vec<i64> {
    let mut ids = Vec::new();
    for i in 0..count {
        let (status, order) = stack
            .post(
                "/api/orders",
                Some(token),
                json!({"items": [{"product_id": 1 + (i % 3) as i64, "quantity": 1 + (i % 2) as i64}]}),
            )
            .await;
        assert_eq!(status, 201, "create order: {order}");
        assert_eq!(order["status"], "pending");
        ids.push(order["id"].as_i64().expect("order id"));
    }
    ids
}

async fn wait_for_status(stack: &mut Stack, token: &str, ids: &[i64], want: &str) {
    stack.assert_running();
    for id in ids {
        let path = format!("/api/orders/{id}");
        let result = tokio::time::timeout(
            Duration::from_secs(60),
            eventually(Duration::from_secs(60), "order status", || async {
                let (_, order) = stack.get(&path, token).await;
                (order["status"] == want).then_some(())
            }),
        )
        .await;
        if result.is_err() {
            stack.assert_running();
            panic!("order {id} did not become {want}");
        }
    }
    stack.assert_running();
}

async fn notification_counts(tdb: &TestDatabase, id: i64, event: &str) -> usize {
    notifications::Entity::find()
        .filter(notifications::Column::OrderId.eq(id))
        .filter(notifications::Column::EventType.eq(event))
        .all(&tdb.db)
        .await
        .expect("notifications")
        .len()
}

/// Each order has exactly one `event` notification (in the database and
/// through the API), with `is_email_sent` as given, and none of `absent`.
async fn assert_one_notification_each(
    stack: &Stack,
    tdb: &TestDatabase,
    token: &str,
    ids: &[i64],
    event: &str,
    email_sent: bool,
    absent: &str,
) {
    for id in ids {
        eventually(Duration::from_secs(30), "the notification row", || async {
            (notification_counts(tdb, *id, event).await == 1).then_some(())
        })
        .await;
        let (status, notes) = stack
            .get(&format!("/api/orders/{id}/notifications"), token)
            .await;
        assert_eq!(status, 200);
        let notes = notes.as_array().expect("array").clone();
        let matching: Vec<_> = notes.iter().filter(|n| n["event_type"] == event).collect();
        assert_eq!(matching.len(), 1, "order {id}: {notes:?}");
        assert_eq!(matching[0]["is_email_sent"], email_sent, "order {id}");
        assert!(
            notes.iter().all(|n| n["event_type"] != absent),
            "order {id} has {absent}: {notes:?}"
        );
        assert_eq!(notification_counts(tdb, *id, absent).await, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_payments_always_approved_every_order_completes_with_one_completed_notification() {
    let tdb = TestDatabase::create().await;
    let broker = TestBroker::create().await;
    let mut stack = Stack::start(&tdb, &broker, "1").await;
    let (token, ids) = place_orders(&stack).await;
    wait_for_status(&mut stack, &token, &ids, "completed").await;

    assert_one_notification_each(
        &stack,
        &tdb,
        &token,
        &ids,
        "OrderCompleted",
        true,
        "OrderExpired",
    )
    .await;
    // Every fake e-mail is in the runner's log, once per order.
    let emails = eventually(Duration::from_secs(10), "fake e-mails logged", || async {
        let n = stack.log("runner").matches("FAKE E-MAIL").count();
        (n >= ORDERS).then_some(n)
    })
    .await;
    assert_eq!(emails, ORDERS);
    stack.stop().await;
    broker.delete().await;
    tdb.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_payments_always_declined_every_order_expires_with_one_expired_notification() {
    let tdb = TestDatabase::create().await;
    let broker = TestBroker::create().await;
    let mut stack = Stack::start(&tdb, &broker, "0").await;
    let (token, ids) = place_orders(&stack).await;
    // Declined payments leave the orders processing until the sweep.
    wait_for_status(&mut stack, &token, &ids, "expired").await;
    assert_one_notification_each(
        &stack,
        &tdb,
        &token,
        &ids,
        "OrderExpired",
        false,
        "OrderCompleted",
    )
    .await;
    assert_eq!(stack.log("runner").matches("FAKE E-MAIL").count(), 0);
    stack.stop().await;
    broker.delete().await;
    tdb.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runner_rides_out_a_broker_outage_without_exiting_or_losing_orders() {
    let tdb = TestDatabase::create().await;
    let broker = TestBroker::create().await;
    let upstream = amqp_url()
        .split_once('@')
        .and_then(|(_, rest)| rest.split('/').next())
        .unwrap_or("127.0.0.1:5672")
        .replace("localhost", "127.0.0.1");
    let proxy = TcpProxy::start(upstream.parse().expect("broker address"))
        .await
        .expect("proxy");
    let runner_env = [
        ("APP__RABBITMQ__URL", proxy.url_for(&amqp_url())),
        ("APP__RABBITMQ__RECONNECT_MAX_BACKOFF_MS", "500".to_owned()),
    ];
    let mut stack = Stack::start_with(&tdb, &broker, "1", &runner_env).await;
    let token = sign_up(&stack).await;
    let before = more_orders(&stack, &token, 10).await;
    wait_for_status(&mut stack, &token, &before, "completed").await;

    // Cut the runner off the broker. The API (not behind the proxy) keeps
    // taking orders; their events wait in the queues.
    proxy.cut();
    let during = more_orders(&stack, &token, 10).await;
    eventually(
        Duration::from_secs(20),
        "the runner noticing the outage",
        || async { stack.log("runner").contains("resubscribing").then_some(()) },
    )
    .await;
    stack.assert_running();

    proxy.restore();
    let mut all = before.clone();
    all.extend(&during);
    wait_for_status(&mut stack, &token, &all, "completed").await;
    assert_one_notification_each(
        &stack,
        &tdb,
        &token,
        &all,
        "OrderCompleted",
        true,
        "OrderExpired",
    )
    .await;
    assert!(
        stack
            .log("runner")
            .contains("resubscribed after losing the broker")
    );
    stack.stop().await;
    broker.delete().await;
    tdb.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runner_rides_out_a_database_outage_without_exiting_or_losing_orders() {
    let tdb = TestDatabase::create().await;
    let broker = TestBroker::create().await;
    let server = tdb
        .url
        .split_once('@')
        .and_then(|(_, rest)| rest.split('/').next())
        .unwrap_or("127.0.0.1:5432")
        .replace("localhost", "127.0.0.1");
    let proxy = TcpProxy::start(server.parse().expect("database address"))
        .await
        .expect("proxy");
    let runner_env = [
        ("APP__DATABASE__URL", proxy.url_for(&tdb.url)),
        ("APP__DATABASE__ACQUIRE_TIMEOUT_SECONDS", "1".to_owned()),
        ("APP__RETRY__MAX_BACKOFF_MS", "500".to_owned()),
    ];
    let mut stack = Stack::start_with(&tdb, &broker, "1", &runner_env).await;
    let token = sign_up(&stack).await;
    let before = more_orders(&stack, &token, 5).await;
    wait_for_status(&mut stack, &token, &before, "completed").await;

    // The runner loses PostgreSQL; the API (direct) keeps taking orders.
    proxy.cut();
    let during = more_orders(&stack, &token, 10).await;
    eventually(
        Duration::from_secs(20),
        "the runner noticing the outage",
        || async {
            stack
                .log("runner")
                .contains("could not be recorded")
                .then_some(())
        },
    )
    .await;
    stack.assert_running();

    proxy.restore();
    let mut all = before.clone();
    all.extend(&during);
    wait_for_status(&mut stack, &token, &all, "completed").await;
    assert_one_notification_each(
        &stack,
        &tdb,
        &token,
        &all,
        "OrderCompleted",
        true,
        "OrderExpired",
    )
    .await;
    // Nothing was parked: an outage does not spend the retry budget.
    let parked = tdb
        .db
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT count(*)::bigint AS n FROM saga_instances WHERE faulted",
        ))
        .await
        .expect("query")
        .expect("row")
        .try_get::<i64>("", "n")
        .expect("count");
    assert_eq!(parked, 0);
    stack.stop().await;
    broker.delete().await;
    tdb.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_every_host_with_exit_0_and_a_restarted_runner_finishes_the_work() {
    let tdb = TestDatabase::create().await;
    let broker = TestBroker::create().await;
    // A 2 s payment keeps every order in flight when the runner is stopped.
    let slow_payment = [("APP__PAYMENT__DELAY_MS", "2000".to_owned())];
    let mut stack = Stack::start_with(&tdb, &broker, "1", &slow_payment).await;
    let (token, ids) = place_orders(&stack).await;
    let status = stack.terminate("runner").await;
    assert!(status.success(), "runner exited with {status}");
    assert!(stack.log("runner").contains("runner stopped"));
    let mut unfinished = 0;
    for id in &ids {
        let (_, order) = stack.get(&format!("/api/orders/{id}"), &token).await;
        if order["status"] != "completed" {
            unfinished += 1;
        }
    }
    assert!(
        unfinished > 0,
        "orders were in flight when the runner stopped"
    );
    stack.spawn_runner(&slow_payment);
    wait_for_status(&mut stack, &token, &ids, "completed").await;
    assert_one_notification_each(
        &stack,
        &tdb,
        &token,
        &ids,
        "OrderCompleted",
        true,
        "OrderExpired",
    )
    .await;
    for host in ["runner", "scheduler", "api"] {
        let status = stack.terminate(host).await;
        assert!(status.success(), "{host} exited with {status}");
    }
    stack.stop().await;
    broker.delete().await;
    tdb.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_operator_commands_list_parked_sagas_and_reject_bad_arguments() {
    let tdb = TestDatabase::create().await;
    let config_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configuration");
    // The api would migrate; here the test database is migrated already.
    tdb.db
        .execute_unprepared(
            "INSERT INTO saga_instances (saga_type, correlation_id, state, version, attempts, \
             faulted, last_error, data, state_entered_at, created_at, updated_at) VALUES \
             ('order', '4242', 'pending', 0, 3, true, 'boom', '{}', now(), now(), now())",
        )
        .await
        .expect("a parked instance");
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_runner"))
            .args(args)
            .env("APP_CONFIG_DIR", &config_dir)
            .env("APP__DATABASE__URL", &tdb.url)
            .env("NO_COLOR", "1")
            .output()
            .expect("runner runs")
    };
    let listed = run(&["parked"]);
    assert!(listed.status.success(), "{listed:?}");
    let parked: Value = serde_json::from_slice(&listed.stdout).expect("JSON on stdout");
    assert_eq!(parked[0]["correlation_id"], "4242");
    assert_eq!(parked[0]["attempts"], 3);
    assert_eq!(parked[0]["last_error"], "boom");

    let bad = run(&["resume", "abc"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("ORDER_ID must be an order id"));
    let unknown = run(&["resume", "999"]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&unknown.stdout).contains("no order saga instance")
            || String::from_utf8_lossy(&unknown.stderr).contains("no order saga instance")
    );
    tdb.drop().await;
}
