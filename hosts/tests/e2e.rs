//! End to end: the real `api`, `runner` and `scheduler` binaries as separate
//! processes, on this machine's PostgreSQL and RabbitMQ (a database, exchange
//! and queues of the test's own), with fast timings set through `APP__...`
//! environment overrides, driven over HTTP.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Api, KafkaTopics, Processes, free_port, host_env, host_env_kafka, kafka_lag_series};
use entity::notifications;
use saga::schema::instances as saga_instances;
use saga::testing::{TcpProxy, TestBroker, TestDatabase, amqp_url, eventually};
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
use serde_json::Value;

const ORDERS: usize = 20;
const WITHIN: Duration = Duration::from_secs(60);

/// The three hosts with one environment; the runner's can be overridden.
struct Stack {
    procs: Processes,
    api: Api,
    env: Vec<(String, String)>,
}

impl Stack {
    async fn start(tdb: &TestDatabase, broker: &TestBroker, success_rate: &str) -> Stack {
        Self::start_with(tdb, broker, success_rate, &[], &[]).await
    }

    /// Like [`Stack::start`], with `runner_env` on top of the runner's
    /// environment (e.g. its broker URL pointing at a proxy).
    async fn start_with(
        tdb: &TestDatabase,
        broker: &TestBroker,
        success_rate: &str,
        runner_env: &[(&str, String)],
        all_env: &[(&str, String)],
    ) -> Stack {
        let port = free_port();
        let mut env = host_env(tdb, broker, port);
        env.extend(all_env.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        Self::launch(port, env, success_rate, runner_env).await
    }

    /// The same three hosts on Kafka (`topics`: the test's own topics).
    async fn start_kafka(
        tdb: &TestDatabase,
        topics: &KafkaTopics,
        success_rate: &str,
        runner_env: &[(&str, String)],
        all_env: &[(&str, String)],
    ) -> Stack {
        let port = free_port();
        let mut env = host_env_kafka(tdb, topics, port);
        env.extend(all_env.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        Self::launch(port, env, success_rate, runner_env).await
    }

    async fn launch(
        port: u16,
        mut env: Vec<(String, String)>,
        success_rate: &str,
        runner_env: &[(&str, String)],
    ) -> Stack {
        let base = format!("http://127.0.0.1:{port}");
        env.push((
            "APP__PAYMENT__SUCCESS_RATE".to_owned(),
            success_rate.to_owned(),
        ));
        let mut stack = Stack {
            procs: Processes::new("e2e"),
            api: Api::new(base),
            env,
        };
        stack
            .procs
            .spawn("api", env!("CARGO_BIN_EXE_api"), &[], &stack.env);
        // The api applies migrations and seeds; the others wait for the schema.
        stack.api.wait_healthy(WITHIN).await;
        stack.spawn_runner(runner_env);
        stack.procs.spawn(
            "scheduler",
            env!("CARGO_BIN_EXE_scheduler"),
            &[],
            &stack.env,
        );
        stack
    }

    /// `http://<monitoring.runner_listen>`.
    fn runner_monitoring(&self) -> String {
        let listen = self
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == "APP__MONITORING__RUNNER_LISTEN")
            .map(|(_, v)| v.clone())
            .expect("runner listen address");
        format!("http://{listen}")
    }

    /// Starts (or restarts) the runner with the stack's environment plus
    /// `overrides`; its log is appended to.
    fn spawn_runner(&mut self, overrides: &[(&str, String)]) {
        let mut env = self.env.clone();
        env.extend(overrides.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        self.procs
            .spawn("runner", env!("CARGO_BIN_EXE_runner"), &[], &env);
    }

    async fn wait_for_status(&mut self, token: &str, ids: &[i64], want: &str) {
        self.api
            .wait_for_status(&mut self.procs, token, ids, want, WITHIN)
            .await;
    }

    /// One `event` notification per order, through the API and in the
    /// database, and none of `absent`.
    async fn assert_one_notification_each(
        &self,
        tdb: &TestDatabase,
        token: &str,
        ids: &[i64],
        event: &str,
        email_sent: bool,
        absent: &str,
    ) {
        self.api
            .assert_one_notification_each(token, ids, event, email_sent, absent)
            .await;
        for id in ids {
            assert_eq!(notification_count(tdb, *id, event).await, 1, "order {id}");
            assert_eq!(notification_count(tdb, *id, absent).await, 0, "order {id}");
        }
    }

    async fn stop(self, broker: TestBroker, tdb: TestDatabase) {
        self.procs.stop().await;
        broker.delete().await;
        tdb.drop().await;
    }
}

async fn notification_count(tdb: &TestDatabase, id: i64, event: &str) -> u64 {
    notifications::Entity::find()
        .filter(notifications::Column::OrderId.eq(id))
        .filter(notifications::Column::EventType.eq(event))
        .count(&tdb.db)
        .await
        .expect("notifications")
}

/// `host:port` of a server URL, for a proxy in front of it.
fn server_addr(url: &str, default_port: u16) -> std::net::SocketAddr {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host_port = if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:{default_port}")
    };
    host_port
        .replace("localhost", "127.0.0.1")
        .parse()
        .expect("server address")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_payments_always_approved_every_order_completes_with_one_completed_notification() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let broker = TestBroker::create(orders::topology::queues).await;
    let mut stack = Stack::start(&tdb, &broker, "1").await;
    let (token, user) = stack.api.register_and_login().await;
    let ids = stack.api.place_orders(&token, user, ORDERS).await;
    stack.wait_for_status(&token, &ids, "completed").await;
    stack
        .assert_one_notification_each(&tdb, &token, &ids, "OrderCompleted", true, "OrderExpired")
        .await;
    // Every fake e-mail is in the runner's log, once per order.
    let emails = eventually(Duration::from_secs(10), "fake e-mails logged", || async {
        let n = stack.procs.log("runner").matches("FAKE E-MAIL").count();
        (n >= ORDERS).then_some(n)
    })
    .await;
    assert_eq!(emails, ORDERS);
    stack.stop(broker, tdb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_payments_always_declined_every_order_expires_with_one_expired_notification() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let broker = TestBroker::create(orders::topology::queues).await;
    let mut stack = Stack::start(&tdb, &broker, "0").await;
    let (token, user) = stack.api.register_and_login().await;
    let ids = stack.api.place_orders(&token, user, ORDERS).await;
    // Declined payments leave the orders processing until the sweep.
    stack.wait_for_status(&token, &ids, "expired").await;
    stack
        .assert_one_notification_each(&tdb, &token, &ids, "OrderExpired", false, "OrderCompleted")
        .await;
    assert_eq!(stack.procs.log("runner").matches("FAKE E-MAIL").count(), 0);
    stack.stop(broker, tdb).await;
}

/// Starts the stack with the runner behind `proxy` (per `runner_env`), places
/// orders, cuts the proxy, places more, waits for the runner to log
/// `noticed`, checks it is still running, restores the proxy and checks that
/// every order completes once. Returns the stack for further checks.
async fn ride_out_an_outage(
    tdb: &TestDatabase,
    broker: &TestBroker,
    proxy: &TcpProxy,
    runner_env: &[(&str, String)],
    noticed: &str,
) -> Stack {
    let mut stack = Stack::start_with(tdb, broker, "1", runner_env, &[]).await;
    let (token, user) = stack.api.register_and_login().await;
    let mut ids = stack.api.place_orders(&token, user, 5).await;
    stack.wait_for_status(&token, &ids, "completed").await;

    // The API (not behind the proxy) keeps taking orders meanwhile.
    proxy.cut();
    ids.extend(stack.api.place_orders(&token, user, 10).await);
    eventually(
        Duration::from_secs(20),
        "the runner noticing the outage",
        || async { stack.procs.log("runner").contains(noticed).then_some(()) },
    )
    .await;
    stack.procs.assert_running();

    proxy.restore();
    stack.wait_for_status(&token, &ids, "completed").await;
    stack
        .assert_one_notification_each(tdb, &token, &ids, "OrderCompleted", true, "OrderExpired")
        .await;
    stack
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runner_rides_out_a_broker_outage_without_exiting_or_losing_orders() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let broker = TestBroker::create(orders::topology::queues).await;
    let proxy = TcpProxy::start(server_addr(&amqp_url(), 5672))
        .await
        .expect("proxy");
    let runner_env = [
        ("APP__RABBITMQ__URL", proxy.url_for(&amqp_url())),
        ("APP__RABBITMQ__RECONNECT_MAX_BACKOFF_MS", "500".to_owned()),
    ];
    let stack = ride_out_an_outage(&tdb, &broker, &proxy, &runner_env, "resubscribing").await;
    assert!(
        stack
            .procs
            .log("runner")
            .contains("resubscribed after losing the broker")
    );
    stack.stop(broker, tdb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runner_rides_out_a_database_outage_without_exiting_or_losing_orders() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let broker = TestBroker::create(orders::topology::queues).await;
    let proxy = TcpProxy::start(server_addr(&tdb.url, 5432))
        .await
        .expect("proxy");
    let runner_env = [
        ("APP__DATABASE__URL", proxy.url_for(&tdb.url)),
        ("APP__DATABASE__ACQUIRE_TIMEOUT_SECONDS", "1".to_owned()),
        ("APP__RETRY__MAX_BACKOFF_MS", "500".to_owned()),
    ];
    let stack =
        ride_out_an_outage(&tdb, &broker, &proxy, &runner_env, "could not be recorded").await;
    // Nothing was parked: an outage does not spend the retry budget.
    let parked = saga_instances::Entity::find()
        .filter(saga_instances::Column::Faulted.eq(true))
        .count(&tdb.db)
        .await
        .expect("count");
    assert_eq!(parked, 0);
    stack.stop(broker, tdb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_every_host_with_exit_0_and_a_restarted_runner_finishes_the_work() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let broker = TestBroker::create(orders::topology::queues).await;
    // A 2 s payment keeps every order in flight when the runner is stopped.
    let slow_payment = [("APP__PAYMENT__DELAY_MS", "2000".to_owned())];
    // No expiry race: the orders wait out the restart, so they must not be
    // swept while the runner is down (the default 2 s timeout could).
    let patient = [(
        "APP__EXPIRATION__PROCESSING_TIMEOUT_SECONDS",
        "120".to_owned(),
    )];
    let mut stack = Stack::start_with(&tdb, &broker, "1", &slow_payment, &patient).await;
    let (token, user) = stack.api.register_and_login().await;
    let ids = stack.api.place_orders(&token, user, ORDERS).await;
    let status = stack.procs.terminate("runner").await;
    assert!(status.success(), "runner exited with {status}");
    assert!(stack.procs.log("runner").contains("runner stopped"));
    let mut unfinished = 0;
    for id in &ids {
        let (_, order) = stack.api.get(&format!("/api/orders/{id}"), &token).await;
        if order["status"] != "completed" {
            unfinished += 1;
        }
    }
    assert!(
        unfinished > 0,
        "orders were in flight when the runner stopped"
    );
    stack.spawn_runner(&slow_payment);
    stack.wait_for_status(&token, &ids, "completed").await;
    stack
        .assert_one_notification_each(&tdb, &token, &ids, "OrderCompleted", true, "OrderExpired")
        .await;
    for host in ["runner", "scheduler", "api"] {
        let status = stack.procs.terminate(host).await;
        assert!(status.success(), "{host} exited with {status}");
    }
    stack.stop(broker, tdb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_operator_commands_list_parked_sagas_redrive_dead_letters_and_reject_bad_arguments()
{
    use sea_orm::ConnectionTrait;
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let broker = TestBroker::create(orders::topology::queues).await;
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
            .env("APP__RABBITMQ__URL", amqp_url())
            .env("APP__RABBITMQ__EXCHANGE", &broker.exchange)
            .env("APP__RABBITMQ__QUEUE_PREFIX", &broker.prefix)
            .env("NO_COLOR", "1")
            .output()
            .expect("runner runs")
    };
    let listed = run(&["parked"]);
    assert!(listed.status.success(), "{listed:?}");
    let parked: Value = serde_json::from_slice(&listed.stdout).expect("JSON on stdout");
    assert_eq!(parked[0]["saga_type"], "order");
    assert_eq!(parked[0]["correlation_id"], "4242");
    assert_eq!(parked[0]["attempts"], 3);
    assert_eq!(parked[0]["last_error"], "boom");
    let of_type = run(&["parked", "--saga", "order", "5"]);
    assert!(of_type.status.success(), "{of_type:?}");
    let parked: Value = serde_json::from_slice(&of_type.stdout).expect("JSON on stdout");
    assert_eq!(parked.as_array().map(Vec::len), Some(1));

    // Bad command lines exit 2 and say what is wrong (clap).
    let stderr = |out: &std::process::Output| String::from_utf8_lossy(&out.stderr).into_owned();
    let unknown_type = run(&["resume", "invoice", "1"]);
    assert_eq!(unknown_type.status.code(), Some(2), "{unknown_type:?}");
    assert!(
        stderr(&unknown_type).contains("invoice"),
        "{unknown_type:?}"
    );
    let missing_id = run(&["resume", "order"]);
    assert_eq!(missing_id.status.code(), Some(2), "{missing_id:?}");
    assert!(
        stderr(&missing_id).contains("CORRELATION_ID"),
        "{missing_id:?}"
    );
    let zero = run(&["parked", "0"]);
    assert_eq!(zero.status.code(), Some(2), "{zero:?}");
    let unknown_command = run(&["explode"]);
    assert_eq!(
        unknown_command.status.code(),
        Some(2),
        "{unknown_command:?}"
    );
    let help = run(&["--help"]);
    assert_eq!(help.status.code(), Some(0), "{help:?}");
    assert!(String::from_utf8_lossy(&help.stdout).contains("redrive"));
    // A well-formed command for an instance that does not exist fails with
    // the reason.
    let unknown = run(&["resume", "order", "999"]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(stderr(&unknown).contains("no order saga instance"));

    // Two dead letters in the saga's error queue; re-drive one, then the rest.
    let queue = orders::topology::saga_queue(&broker.prefix);
    for body in [&b"{first"[..], &b"{second"[..]] {
        broker
            .transport
            .publish_to_queue(&queue.error_queue(), body, Default::default())
            .await
            .expect("a dead letter");
    }
    let one = run(&["redrive", "order-saga", "1"]);
    assert!(one.status.success(), "{one:?}");
    assert!(String::from_utf8_lossy(&one.stderr).contains("moved=1"));
    // The counts before and after are on stdout, and in the operator-action log.
    let report: Value = serde_json::from_slice(&one.stdout).expect("JSON on stdout");
    assert_eq!(report["moved"], 1);
    assert_eq!(report["before"]["error_queue"], 2);
    assert_eq!(report["after"]["error_queue"], 1);
    let logged = saga::operator::get(&tdb.db, report["action_id"].as_i64().expect("id"))
        .await
        .expect("log")
        .expect("the re-drive is logged");
    assert_eq!(logged.action, "redrive");
    assert!(logged.operator.ends_with("cli"), "{logged:?}");
    assert_eq!(logged.queue.as_deref(), Some(queue.name.as_str()));
    assert_eq!(
        logged.detail.as_ref().map(|d| d["moved"].clone()),
        Some(1.into())
    );
    let depth = |name: String| {
        let transport = &broker.transport;
        async move { transport.queue_depth(&name).await.expect("depth") }
    };
    assert_eq!(depth(queue.name.clone()).await, 1);
    assert_eq!(depth(queue.error_queue()).await, 1);
    let rest = run(&["redrive", "order-saga"]);
    assert!(rest.status.success(), "{rest:?}");
    assert_eq!(depth(queue.name.clone()).await, 2);
    assert_eq!(depth(queue.error_queue()).await, 0);
    let bad_queue = run(&["redrive", "orders"]);
    assert_eq!(bad_queue.status.code(), Some(2));
    broker.delete().await;
    tdb.drop().await;
}

// ---- The same flows on Kafka (`transport.kind=kafka`) -------------------
//
// The broker is `KAFKA_BOOTSTRAP` (default 127.0.0.1:19092, started by
// `scripts/kafka-broker.sh start`); without one these tests fail. Each test
// creates its own topics (a fresh prefix) and deletes them at the end.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kafka_every_order_completes_once_the_runner_is_ready_and_its_lag_drains_to_zero() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let topics = KafkaTopics::create().await;
    let mut stack = Stack::start_kafka(&tdb, &topics, "1", &[], &[]).await;
    let http = reqwest::Client::new();
    let monitoring = stack.runner_monitoring();
    // Ready: the broker answers and both consumers are in their groups.
    let ready = eventually(WITHIN, "the runner ready on Kafka", || async {
        let response = http
            .get(format!("{monitoring}/health/ready"))
            .send()
            .await
            .ok()?;
        if response.status() != 200 {
            return None;
        }
        response.json::<Value>().await.ok()
    })
    .await;
    let checks = ready["checks"].as_array().expect("checks");
    let broker = checks
        .iter()
        .find(|c| c["name"] == "broker")
        .expect("a broker check");
    assert!(
        broker["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("connected to Kafka")),
        "{ready}"
    );
    let (token, user) = stack.api.register_and_login().await;
    let ids = stack.api.place_orders(&token, user, ORDERS).await;
    stack.wait_for_status(&token, &ids, "completed").await;
    stack
        .assert_one_notification_each(&tdb, &token, &ids, "OrderCompleted", true, "OrderExpired")
        .await;
    let emails = eventually(Duration::from_secs(10), "fake e-mails logged", || async {
        let n = stack.procs.log("runner").matches("FAKE E-MAIL").count();
        (n >= ORDERS).then_some(n)
    })
    .await;
    assert_eq!(emails, ORDERS);
    // /metrics: a lag series per consumer, topic and partition; all drain
    // to 0 once every event is handled and committed.
    let series = eventually(WITHIN, "every Kafka lag series at 0", || async {
        let text = http
            .get(format!("{monitoring}/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let series = kafka_lag_series(&text);
        let both = ["consumer=\"order-saga\"", "consumer=\"notifications\""]
            .iter()
            .all(|c| series.iter().any(|(labels, _)| labels.contains(c)));
        (both && series.iter().all(|(_, lag)| *lag == 0.0)).then_some(series)
    })
    .await;
    let created = topics.settings.event_topic("order.created");
    assert!(
        series.iter().any(
            |(labels, _)| labels.contains(&format!("topic=\"{created}\""))
                && labels.contains("partition=\"2\"")
        ),
        "{series:?}"
    );
    stack.procs.stop().await;
    topics.delete().await;
    tdb.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kafka_with_payments_always_declined_every_order_expires_once() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let topics = KafkaTopics::create().await;
    let mut stack = Stack::start_kafka(&tdb, &topics, "0", &[], &[]).await;
    let (token, user) = stack.api.register_and_login().await;
    let ids = stack.api.place_orders(&token, user, ORDERS).await;
    stack.wait_for_status(&token, &ids, "expired").await;
    stack
        .assert_one_notification_each(&tdb, &token, &ids, "OrderExpired", false, "OrderCompleted")
        .await;
    assert_eq!(stack.procs.log("runner").matches("FAKE E-MAIL").count(), 0);
    stack.procs.stop().await;
    topics.delete().await;
    tdb.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kafka_sigterm_stops_every_host_with_exit_0_and_a_restarted_runner_finishes_the_work() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let topics = KafkaTopics::create().await;
    let slow_payment = [("APP__PAYMENT__DELAY_MS", "2000".to_owned())];
    let patient = [(
        "APP__EXPIRATION__PROCESSING_TIMEOUT_SECONDS",
        "120".to_owned(),
    )];
    let mut stack = Stack::start_kafka(&tdb, &topics, "1", &slow_payment, &patient).await;
    let (token, user) = stack.api.register_and_login().await;
    let ids = stack.api.place_orders(&token, user, ORDERS).await;
    // Some orders reached the runner (processing) before it is stopped.
    eventually(WITHIN, "an order processing", || async {
        for id in &ids {
            let (_, order) = stack.api.get(&format!("/api/orders/{id}"), &token).await;
            if order["status"] == "processing" {
                return Some(());
            }
        }
        None
    })
    .await;
    let status = stack.procs.terminate("runner").await;
    assert!(status.success(), "runner exited with {status}");
    assert!(stack.procs.log("runner").contains("runner stopped"));
    let mut unfinished = 0;
    for id in &ids {
        let (_, order) = stack.api.get(&format!("/api/orders/{id}"), &token).await;
        if order["status"] != "completed" {
            unfinished += 1;
        }
    }
    assert!(
        unfinished > 0,
        "orders were in flight when the runner stopped"
    );
    stack.spawn_runner(&slow_payment);
    stack.wait_for_status(&token, &ids, "completed").await;
    stack
        .assert_one_notification_each(&tdb, &token, &ids, "OrderCompleted", true, "OrderExpired")
        .await;
    for host in ["runner", "scheduler", "api"] {
        let status = stack.procs.terminate(host).await;
        assert!(status.success(), "{host} exited with {status}");
    }
    stack.procs.stop().await;
    topics.delete().await;
    tdb.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kafka_runner_redrive_moves_dead_letters_from_the_error_topic_back_to_the_queue() {
    use futures_util::StreamExt;
    use saga::transport::{OutgoingMessage, Transport};
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let topics = KafkaTopics::create().await;
    let queue = orders::topology::saga_queue(&topics.prefix);
    // Two malformed messages, dead-lettered by a consumer of the queue's
    // group (as the runner does with what it cannot decode).
    for body in ["{first", "{second"] {
        let message = OutgoingMessage {
            message_id: uuid::Uuid::new_v4(),
            message_type: "OrderCreated".to_owned(),
            correlation_id: "4242".to_owned(),
            routing_key: "order.created".to_owned(),
            body: body.as_bytes().to_vec(),
            trace: None,
        };
        topics
            .transport
            .publish_to_queue(&queue, &message)
            .await
            .expect("into the queue");
    }
    let mut stream = topics
        .transport
        .subscribe(&queue, &format!("{}-dead-letterer", topics.prefix), 8)
        .await
        .expect("subscribe");
    for _ in 0..2 {
        let delivery = tokio::time::timeout(WITHIN, stream.next())
            .await
            .expect("a delivery")
            .expect("stream open")
            .expect("delivery");
        topics
            .transport
            .dead_letter(&queue, &delivery, "malformed message", 1)
            .await
            .expect("dead-lettered");
        delivery.acker.ack().await.expect("ack");
    }
    drop(stream);
    let config_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configuration");
    let run = |args: &[&str]| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_runner"));
        command
            .args(args)
            .env("APP_CONFIG_DIR", &config_dir)
            .env("APP__DATABASE__URL", &tdb.url)
            .env("NO_COLOR", "1");
        for (k, v) in topics.env() {
            command.env(k, v);
        }
        command.output().expect("runner runs")
    };
    let one = run(&["redrive", "order-saga", "1"]);
    assert!(one.status.success(), "{one:?}");
    let report: Value = serde_json::from_slice(&one.stdout).expect("JSON on stdout");
    assert_eq!(report["moved"], 1, "{report}");
    assert_eq!(report["before"]["error_queue"], 2, "{report}");
    assert_eq!(report["after"]["error_queue"], 1, "{report}");
    assert_eq!(report["queue"], queue.name.as_str());
    let logged = saga::operator::get(&tdb.db, report["action_id"].as_i64().expect("id"))
        .await
        .expect("log")
        .expect("the re-drive is logged");
    assert_eq!(logged.action, "redrive");
    let rest = run(&["redrive", "order-saga"]);
    assert!(rest.status.success(), "{rest:?}");
    let report: Value = serde_json::from_slice(&rest.stdout).expect("JSON on stdout");
    assert_eq!(report["moved"], 1, "{report}");
    assert_eq!(report["after"]["error_queue"], 0, "{report}");
    // Both are back in the queue (its direct topic), once each, and the
    // error topic has nothing left to redrive.
    assert_eq!(
        topics
            .transport
            .dead_letter_count(&queue)
            .await
            .expect("count"),
        0
    );
    let mut stream = topics
        .transport
        .subscribe(&queue, &format!("{}-reader", topics.prefix), 8)
        .await
        .expect("subscribe");
    let mut bodies = Vec::new();
    for _ in 0..2 {
        let delivery = tokio::time::timeout(WITHIN, stream.next())
            .await
            .expect("a redriven delivery")
            .expect("stream open")
            .expect("delivery");
        bodies.push(String::from_utf8_lossy(&delivery.body).into_owned());
        delivery.acker.ack().await.expect("ack");
    }
    bodies.sort();
    assert_eq!(bodies, ["{first", "{second"]);
    drop(stream);
    topics.delete().await;
    tdb.drop().await;
}
