//! Metrics and health, end to end: the real `api`, `runner` and `scheduler`
//! binaries as processes (each has its own metrics recorder, so counts are
//! exact), on this machine's PostgreSQL and RabbitMQ with a database,
//! exchange and queues of the test's own; faults through a TCP proxy and by
//! deleting the test's own queue under a running runner.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::{Api, Processes, free_port};
use saga::testing::{TcpProxy, TestBroker, TestDatabase, amqp_url, eventually};
use serde_json::Value;

const WITHIN: Duration = Duration::from_secs(60);

/// [`common::host_env`] with `success_rate` and a 1 s processing timeout.
fn stack_env(tdb: &TestDatabase, broker: &TestBroker, success_rate: &str) -> Vec<(String, String)> {
    let mut env = common::host_env(tdb, broker, free_port());
    env.extend([
        (
            "APP__PAYMENT__SUCCESS_RATE".to_owned(),
            success_rate.to_owned(),
        ),
        (
            "APP__EXPIRATION__PROCESSING_TIMEOUT_SECONDS".to_owned(),
            "1".to_owned(),
        ),
    ]);
    env
}

fn env_value(env: &[(String, String)], key: &str) -> String {
    env.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("{key} is set"))
}

fn with_overrides(env: &[(String, String)], overrides: &[(&str, String)]) -> Vec<(String, String)> {
    let mut env = env.to_vec();
    env.extend(overrides.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
    env
}

/// `http://` base URL of a host's monitoring listener or API.
fn base_of(env: &[(String, String)], key: &str) -> String {
    format!("http://{}", env_value(env, key))
}

async fn get_text(url: &str) -> Option<(u16, String)> {
    let response = reqwest::get(url).await.ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.ok()?))
}

async fn health(base: &str, which: &str) -> Option<(u16, Value)> {
    let (status, body) = get_text(&format!("{base}/health/{which}")).await?;
    Some((status, serde_json::from_str(&body).ok()?))
}

/// Waits until `base`'s `/health/ready` answers `want`, and returns the body.
async fn wait_ready(procs: &mut Processes, base: &str, want: u16, what: &str) -> Value {
    let deadline = tokio::time::Instant::now() + WITHIN;
    loop {
        procs.assert_running();
        let answer = health(base, "ready").await;
        if let Some((status, body)) = &answer
            && *status == want
        {
            return body.clone();
        }
        if tokio::time::Instant::now() >= deadline {
            procs.fail(&format!("{what}: last /health/ready answer {answer:?}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of the series `name` whose labels include `labels`, summed
/// over every such series (0 when there is none: a counter not yet touched).
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, series_labels) = match series.split_once('{') {
                Some((n, rest)) => (n, parse_labels(rest.trim_end_matches('}'))),
                None => (series, BTreeMap::new()),
            };
            (series_name == name
                && labels
                    .iter()
                    .all(|(k, v)| series_labels.get(*k).map(String::as_str) == Some(*v)))
            .then(|| value.parse::<f64>().ok())
            .flatten()
        })
        .sum()
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    s.split("\",")
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            Some((k.trim().to_owned(), v.trim_matches('"').to_owned()))
        })
        .collect()
}

/// Every value of label `label` on series `name`.
fn label_values(text: &str, name: &str, label: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter_map(|l| {
            let rest = l.split_once('{')?.1.split_once('}')?.0;
            parse_labels(rest).get(label).cloned()
        })
        .collect()
}

async fn scrape(procs: &mut Processes, base: &str) -> String {
    procs.assert_running();
    let (status, text) = get_text(&format!("{base}/metrics"))
        .await
        .unwrap_or_else(|| procs.fail(&format!("{base}/metrics did not answer")));
    assert_eq!(status, 200, "{text}");
    text
}

/// Starts api, runner and scheduler; returns the processes, the API client
/// and the environment (with each host's address).
async fn start_all(
    tdb: &TestDatabase,
    broker: &TestBroker,
    success_rate: &str,
) -> (Processes, Api, Vec<(String, String)>) {
    let env = stack_env(tdb, broker, success_rate);
    let mut procs = Processes::new("monitoring");
    procs.spawn("api", env!("CARGO_BIN_EXE_api"), &[], &env);
    let api = Api::new(env_value(&env, "APP__API__PUBLIC_URL"));
    api.wait_healthy(WITHIN).await;
    procs.spawn("runner", env!("CARGO_BIN_EXE_runner"), &[], &env);
    procs.spawn("scheduler", env!("CARGO_BIN_EXE_scheduler"), &[], &env);
    for key in [
        "APP__MONITORING__RUNNER_LISTEN",
        "APP__MONITORING__SCHEDULER_LISTEN",
    ] {
        wait_ready(&mut procs, &base_of(&env, key), 200, key).await;
    }
    (procs, api, env)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_after_three_completed_orders_shows_every_counter_moved_by_three() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let broker = TestBroker::create(orders::topology::queues).await;
    let (mut procs, api, env) = start_all(&tdb, &broker, "1").await;
    let runner = base_of(&env, "APP__MONITORING__RUNNER_LISTEN");
    let scheduler = base_of(&env, "APP__MONITORING__SCHEDULER_LISTEN");
    let created = ("message_type", "OrderCreated");
    let ok = ("outcome", "ok");

    let before = scrape(&mut procs, &runner).await;
    assert_eq!(
        metric(&before, "saga_messages_consumed_total", &[created]),
        0.0
    );

    let (token, user) = api.register_and_login().await;
    let ids = api.place_orders(&token, user, 3).await;
    api.wait_for_status(&mut procs, &token, &ids, "completed", WITHIN)
        .await;
    api.assert_one_notification_each(&token, &ids, "OrderCompleted", true, "OrderExpired")
        .await;

    // The last delivery is counted right after its ack: wait for it, then
    // every count must be exact.
    let completed_notes = [
        ("consumer", "notifications"),
        ("message_type", "OrderCompleted"),
        ok,
    ];
    let text = eventually(WITHIN, "the runner to count 3 OrderCompleted", || {
        let runner = runner.clone();
        async move {
            let text = get_text(&format!("{runner}/metrics")).await?.1;
            (metric(&text, "saga_messages_consumed_total", &completed_notes) >= 3.0).then_some(text)
        }
    })
    .await;
    let count = |name: &str, labels: &[(&str, &str)]| metric(&text, name, labels);
    assert_eq!(
        count(
            "saga_messages_consumed_total",
            &[("consumer", "order-saga"), created, ok]
        ),
        3.0,
        "{text}"
    );
    assert_eq!(
        count(
            "saga_messages_consumed_total",
            &[("consumer", "notifications"), created, ok]
        ),
        3.0
    );
    assert_eq!(count("saga_messages_consumed_total", &completed_notes), 3.0);
    for outcome in ["duplicate", "retried", "dead_lettered"] {
        assert_eq!(
            count("saga_messages_consumed_total", &[("outcome", outcome)]),
            0.0,
            "{outcome}"
        );
    }
    assert_eq!(
        count(
            "saga_transitions_total",
            &[
                ("saga_type", "order"),
                ("from", "pending"),
                ("to", "processing")
            ]
        ),
        3.0
    );
    assert_eq!(
        count(
            "saga_transitions_total",
            &[("from", "processing"), ("to", "completed")]
        ),
        3.0
    );
    assert_eq!(
        count("saga_timers_fired_total", &[("saga_type", "order")]),
        3.0
    );
    assert_eq!(count("saga_timer_lateness_seconds_count", &[]), 3.0);
    assert_eq!(
        count(
            "saga_handler_duration_seconds_count",
            &[("consumer", "order-saga")]
        ),
        3.0
    );
    assert_eq!(
        count(
            "saga_handler_duration_seconds_count",
            &[("consumer", "notifications")]
        ),
        6.0
    );
    assert_eq!(count("saga_broker_reconnects_total", &[]), 0.0);
    // Database-wide gauges, computed at the scrape.
    assert_eq!(count("saga_orders", &[("status", "completed")]), 3.0);
    for status in ["pending", "processing", "expired"] {
        assert_eq!(count("saga_orders", &[("status", status)]), 0.0, "{status}");
    }
    // The library's own gauge: instances by saga type and state.
    let order_saga = ("saga_type", "order");
    assert_eq!(
        count("saga_instances", &[order_saga, ("state", "completed")]),
        3.0
    );
    for state in ["pending", "processing", "expired"] {
        assert_eq!(
            count("saga_instances", &[order_saga, ("state", state)]),
            0.0,
            "{state}"
        );
    }
    assert_eq!(count("saga_instances_parked", &[order_saga]), 0.0);
    assert_eq!(count("saga_timers_pending", &[]), 0.0);
    assert_eq!(count("saga_timers_overdue", &[]), 0.0);

    // Any relay may publish any outbox row: 3 OrderCreated + 3
    // OrderCompleted were published once each, across the three hosts.
    let api_base = env_value(&env, "APP__API__PUBLIC_URL");
    let published = eventually(WITHIN, "6 events published", || {
        let bases = [api_base.clone(), runner.clone(), scheduler.clone()];
        async move {
            let mut total = 0.0;
            for base in bases {
                let text = get_text(&format!("{base}/metrics")).await?.1;
                total += metric(&text, "saga_outbox_published_total", &[]);
            }
            (total >= 6.0).then_some(total)
        }
    })
    .await;
    assert_eq!(published, 6.0);
    let runner_text = scrape(&mut procs, &runner).await;
    assert_eq!(metric(&runner_text, "saga_outbox_unsent", &[]), 0.0);
    assert_eq!(
        metric(&runner_text, "saga_outbox_oldest_unsent_age_seconds", &[]),
        0.0
    );

    // The API counts requests by route template, never by raw path.
    let api_text = scrape(&mut procs, &api_base).await;
    let post_orders = [
        ("method", "POST"),
        ("route", "/api/orders"),
        ("status", "201"),
    ];
    assert_eq!(
        metric(&api_text, "http_requests_total", &post_orders),
        3.0,
        "{api_text}"
    );
    assert_eq!(
        metric(
            &api_text,
            "http_request_duration_seconds_count",
            &post_orders
        ),
        3.0
    );
    let routes = label_values(&api_text, "http_requests_total", "route");
    // poem-openapi's router names path parameters `:param0`, `:param1`...
    assert!(
        routes.iter().any(|r| r == "/api/orders/:param0"),
        "a templated order route: {routes:?}"
    );
    for id in &ids {
        assert!(
            routes.iter().all(|r| !r.contains(&format!("/{id}"))),
            "no raw ids in routes: {routes:?}"
        );
    }

    // The scheduler sweeps every second and expired nothing.
    let scheduler_text = eventually(WITHIN, "a counted sweep", || {
        let scheduler = scheduler.clone();
        async move {
            let text = get_text(&format!("{scheduler}/metrics")).await?.1;
            (metric(
                &text,
                "saga_sweeps_total",
                &[("saga_type", "order"), ("outcome", "ok")],
            ) >= 1.0)
                .then_some(text)
        }
    })
    .await;
    assert_eq!(
        metric(&scheduler_text, "saga_state_timeouts_total", &[]),
        0.0
    );
    assert_eq!(
        metric(
            &scheduler_text,
            "saga_sweeps_total",
            &[("outcome", "failed")]
        ),
        0.0
    );

    procs.stop().await;
    broker.delete().await;
    tdb.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_after_two_declined_orders_shows_two_expired_by_the_scheduler() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let broker = TestBroker::create(orders::topology::queues).await;
    let (mut procs, api, env) = start_all(&tdb, &broker, "0").await;
    let runner = base_of(&env, "APP__MONITORING__RUNNER_LISTEN");
    let scheduler = base_of(&env, "APP__MONITORING__SCHEDULER_LISTEN");
    let (token, user) = api.register_and_login().await;
    let ids = api.place_orders(&token, user, 2).await;
    api.wait_for_status(&mut procs, &token, &ids, "expired", WITHIN)
        .await;

    let expired_notes = [
        ("consumer", "notifications"),
        ("message_type", "OrderExpired"),
        ("outcome", "ok"),
    ];
    let runner_text = eventually(WITHIN, "the runner to count 2 OrderExpired", || {
        let runner = runner.clone();
        async move {
            let text = get_text(&format!("{runner}/metrics")).await?.1;
            (metric(&text, "saga_messages_consumed_total", &expired_notes) >= 2.0).then_some(text)
        }
    })
    .await;
    assert_eq!(
        metric(&runner_text, "saga_messages_consumed_total", &expired_notes),
        2.0
    );
    // A declined payment is an applied transition that stays processing.
    assert_eq!(
        metric(
            &runner_text,
            "saga_transitions_total",
            &[("from", "processing"), ("to", "processing")]
        ),
        2.0
    );
    let scheduler_text = scrape(&mut procs, &scheduler).await;
    assert_eq!(
        metric(
            &scheduler_text,
            "saga_state_timeouts_total",
            &[("saga_type", "order"), ("state", "processing")]
        ),
        2.0
    );
    assert_eq!(
        metric(
            &scheduler_text,
            "saga_transitions_total",
            &[("from", "processing"), ("to", "expired")]
        ),
        2.0
    );
    assert_eq!(
        metric(&scheduler_text, "saga_orders", &[("status", "expired")]),
        2.0
    );

    procs.stop().await;
    broker.delete().await;
    tdb.drop().await;
}

/// The check named `name` in a health report.
fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .and_then(|checks| checks.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no check {name} in {report}"))
}

fn failed(report: &Value) -> Vec<String> {
    report["failed"]
        .as_array()
        .expect("failed is a list")
        .iter()
        .filter_map(|f| f.as_str().map(str::to_owned))
        .collect()
}

/// Only the runner (the test database is migrated already).
fn start_runner(env: &[(String, String)]) -> Processes {
    let mut procs = Processes::new("monitoring-runner");
    procs.spawn("runner", env!("CARGO_BIN_EXE_runner"), &[], env);
    procs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_names_the_broker_while_its_connection_is_cut_and_recovers_when_it_returns() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let broker = TestBroker::create(orders::topology::queues).await;
    let upstream = format!(
        "127.0.0.1:{}",
        amqp_url()
            .rsplit_once(':')
            .and_then(|(_, rest)| rest.split('/').next())
            .unwrap_or("5672")
    );
    let proxy = TcpProxy::start(upstream.parse().expect("broker address"))
        .await
        .expect("proxy");
    let env = with_overrides(
        &stack_env(&tdb, &broker, "1"),
        &[
            ("APP__RABBITMQ__URL", proxy.url_for(&amqp_url())),
            ("APP__RABBITMQ__RECONNECT_MAX_BACKOFF_MS", "300".into()),
        ],
    );
    let runner = base_of(&env, "APP__MONITORING__RUNNER_LISTEN");
    let mut procs = start_runner(&env);

    let ready = wait_ready(&mut procs, &runner, 200, "the runner to be ready").await;
    assert_eq!(ready["status"], "ok");
    assert!(failed(&ready).is_empty());
    for name in [
        "database",
        "broker",
        "consumer:order-saga",
        "consumer:notifications",
        "outbox_lag",
    ] {
        assert_eq!(check(&ready, name)["ok"], true, "{name}: {ready}");
    }

    proxy.cut();
    let cut = wait_ready(&mut procs, &runner, 503, "the runner to notice the cut").await;
    assert_eq!(cut["status"], "unavailable");
    assert!(failed(&cut).contains(&"broker".to_owned()), "{cut}");
    assert_eq!(check(&cut, "broker")["ok"], false);
    assert!(
        check(&cut, "broker")["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("not connected")),
        "{cut}"
    );
    assert_eq!(check(&cut, "database")["ok"], true, "{cut}");
    // Still alive: its loops run, they are waiting for the broker.
    let (status, live) = health(&runner, "live").await.expect("live answers");
    assert_eq!(status, 200, "{live}");

    proxy.restore();
    let back = wait_ready(&mut procs, &runner, 200, "the runner to recover").await;
    assert_eq!(check(&back, "consumer:order-saga")["ok"], true, "{back}");
    let text = scrape(&mut procs, &runner).await;
    assert!(
        metric(&text, "saga_broker_reconnects_total", &[]) >= 1.0,
        "{text}"
    );

    procs.stop().await;
    broker.delete().await;
    tdb.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_whose_queue_is_deleted_under_it_is_reported_until_it_subscribes_again() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let broker = TestBroker::create(orders::topology::queues).await;
    // A long resubscribe backoff keeps the consumer away long enough to see.
    let env = with_overrides(
        &stack_env(&tdb, &broker, "1"),
        &[
            ("APP__RABBITMQ__RECONNECT_INITIAL_BACKOFF_MS", "3000".into()),
            ("APP__RABBITMQ__RECONNECT_MAX_BACKOFF_MS", "3000".into()),
        ],
    );
    let runner = base_of(&env, "APP__MONITORING__RUNNER_LISTEN");
    let mut procs = start_runner(&env);
    wait_ready(&mut procs, &runner, 200, "the runner to be ready").await;

    // The test's own queue: the broker cancels the runner's consumer on it.
    let queue = orders::topology::saga_queue(&broker.prefix).name;
    let deleted = std::process::Command::new("rabbitmqctl")
        .args(["delete_queue", &queue])
        .output()
        .expect("rabbitmqctl runs (is RabbitMQ installed?)");
    assert!(deleted.status.success(), "{deleted:?}");

    let report = wait_ready(&mut procs, &runner, 503, "the lost consumer to be reported").await;
    assert_eq!(failed(&report), ["consumer:order-saga"], "{report}");
    let detail = check(&report, "consumer:order-saga")["detail"]
        .as_str()
        .expect("detail")
        .to_owned();
    assert!(detail.starts_with("not registered"), "{detail}");
    assert_eq!(check(&report, "broker")["ok"], true, "{report}");
    assert_eq!(check(&report, "consumer:notifications")["ok"], true);

    // It declares the queue again and resubscribes after its backoff.
    let back = wait_ready(&mut procs, &runner, 200, "the consumer to come back").await;
    assert_eq!(check(&back, "consumer:order-saga")["ok"], true, "{back}");
    let text = scrape(&mut procs, &runner).await;
    assert!(
        metric(
            &text,
            "saga_consumer_subscriptions_lost_total",
            &[("consumer", "order-saga")]
        ) >= 1.0,
        "{text}"
    );

    procs.stop().await;
    broker.delete().await;
    tdb.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_monitoring_port_stops_the_runner_with_a_message_naming_the_key() {
    let tdb = TestDatabase::create_with::<migration::Migrator>().await;
    let broker = TestBroker::create(orders::topology::queues).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let address = taken.local_addr().expect("address").to_string();
    let env = with_overrides(
        &stack_env(&tdb, &broker, "1"),
        &[("APP__MONITORING__RUNNER_LISTEN", address)],
    );
    let config_dir = env_value(&env, "APP_CONFIG_DIR");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_runner"))
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("APP_CONFIG_DIR", config_dir)
        .output()
        .expect("runner runs");
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("monitoring.runner_listen"), "{stderr}");
    drop(taken);
    broker.delete().await;
    tdb.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_host_serves_the_same_health_and_metrics_on_its_api_port() {
    let mut procs = Processes::new("monitoring-embedded");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let config_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configuration");
    let db_file = procs.logs.join("order-saga.db");
    let env: Vec<(String, String)> = [
        ("APP_CONFIG_DIR", config_dir.display().to_string()),
        (
            "APP__EMBEDDED__DATABASE_URL",
            format!("sqlite://{}?mode=rwc", db_file.display()),
        ),
        ("APP__API__LISTEN", format!("127.0.0.1:{port}")),
        ("APP__API__PUBLIC_URL", base.clone()),
        ("APP__PAYMENT__DELAY_MS", "100".into()),
        ("APP__PAYMENT__SUCCESS_RATE", "1".into()),
        ("RUST_LOG", "info,sqlx=warn".into()),
        ("NO_COLOR", "1".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    procs.spawn("embedded", env!("CARGO_BIN_EXE_embedded"), &[], &env);
    let ready = wait_ready(&mut procs, &base, 200, "the embedded host to be ready").await;
    assert_eq!(
        check(&ready, "broker")["detail"],
        "in-process transport",
        "{ready}"
    );
    for name in [
        "consumer:order-saga",
        "consumer:notifications",
        "outbox_lag",
    ] {
        assert_eq!(check(&ready, name)["ok"], true, "{name}: {ready}");
    }
    let (status, live) = health(&base, "live").await.expect("live answers");
    assert_eq!(status, 200, "{live}");
    for name in [
        "loop:order-saga consumer",
        "loop:notifications consumer",
        "loop:timers",
        "loop:expiration sweeps",
        "loop:outbox relay",
    ] {
        assert_eq!(check(&live, name)["ok"], true, "{name}: {live}");
    }

    let api = Api::new(base.clone());
    let (token, user) = api.register_and_login().await;
    let ids = api.place_orders(&token, user, 2).await;
    api.wait_for_status(&mut procs, &token, &ids, "completed", WITHIN)
        .await;
    let text = eventually(WITHIN, "2 OrderCompleted notifications counted", || {
        let base = base.clone();
        async move {
            let text = get_text(&format!("{base}/metrics")).await?.1;
            let completed = [
                ("consumer", "notifications"),
                ("message_type", "OrderCompleted"),
                ("outcome", "ok"),
            ];
            (metric(&text, "saga_messages_consumed_total", &completed) >= 2.0).then_some(text)
        }
    })
    .await;
    assert_eq!(
        metric(
            &text,
            "saga_transitions_total",
            &[("from", "processing"), ("to", "completed")]
        ),
        2.0,
        "{text}"
    );
    assert_eq!(metric(&text, "saga_outbox_published_total", &[]), 4.0);
    assert_eq!(
        metric(&text, "saga_orders", &[("status", "completed")]),
        2.0
    );
    procs.stop().await;
}
