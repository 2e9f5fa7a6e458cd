//! End to end, embedded: the `embedded` binary (API, runner and scheduler in
//! one process, SQLite, in-process transport) started as a process with a
//! temporary SQLite file, a free port and fast timings set through `APP__...`
//! overrides, driven over HTTP. Needs neither PostgreSQL nor RabbitMQ.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Api, Processes, free_port};
use saga::testing::eventually;

const ORDERS: usize = 10;

/// Starts the embedded binary on its own SQLite file and port.
async fn start(label: &str, success_rate: &str) -> (Processes, Api) {
    let mut processes = Processes::new(label);
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let config_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configuration");
    // A folder that does not exist yet: the binary creates it, as it creates
    // `data/` on a fresh clone.
    let db_file = processes.logs.join("data").join("order-saga.db");
    let env: Vec<(String, String)> = [
        ("APP_CONFIG_DIR", config_dir.display().to_string()),
        (
            "APP__EMBEDDED__DATABASE_URL",
            format!("sqlite://{}?mode=rwc", db_file.display()),
        ),
        ("APP__API__LISTEN", format!("127.0.0.1:{port}")),
        ("APP__API__PUBLIC_URL", base.clone()),
        ("APP__PAYMENT__DELAY_MS", "100".into()),
        ("APP__PAYMENT__SUCCESS_RATE", success_rate.into()),
        ("APP__EXPIRATION__PROCESSING_TIMEOUT_SECONDS", "2".into()),
        ("APP__EXPIRATION__SWEEP_INTERVAL_SECONDS", "1".into()),
        ("APP__OUTBOX__POLL_INTERVAL_MS", "100".into()),
        ("RUST_LOG", "info,sqlx=warn".into()),
        ("NO_COLOR", "1".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    processes.spawn("embedded", env!("CARGO_BIN_EXE_embedded"), &[], &env);
    let api = Api::new(base.clone());
    api.wait_healthy(Duration::from_secs(60)).await;
    processes.assert_running();
    let log = processes.log("embedded");
    let swagger = format!("Swagger UI at {base}/swagger");
    if !log.contains(&swagger) {
        processes.fail(&format!("the log does not say `{swagger}`"));
    }
    assert!(db_file.is_file(), "the SQLite file {db_file:?} was created");
    (processes, api)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_with_payments_always_approved_every_order_completes_once() {
    let (mut processes, api) = start("embedded-ok", "1").await;
    let (token, user_id) = api.register_and_login().await;
    let ids = api.place_orders(&token, user_id, ORDERS).await;
    api.wait_for_status(
        &mut processes,
        &token,
        &ids,
        "completed",
        Duration::from_secs(60),
    )
    .await;
    api.assert_one_notification_each(&token, &ids, "OrderCompleted", true, "OrderExpired")
        .await;
    api.assert_one_notification_each(&token, &ids, "OrderCreated", false, "OrderExpired")
        .await;
    let emails = eventually(Duration::from_secs(10), "fake e-mails logged", || async {
        let n = processes.log("embedded").matches("FAKE E-MAIL").count();
        (n >= ORDERS).then_some(n)
    })
    .await;
    assert_eq!(emails, ORDERS, "one fake e-mail per order");
    processes.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_with_payments_always_declined_every_order_expires_once() {
    let (mut processes, api) = start("embedded-expire", "0").await;
    let (token, user_id) = api.register_and_login().await;
    let ids = api.place_orders(&token, user_id, ORDERS).await;
    api.wait_for_status(
        &mut processes,
        &token,
        &ids,
        "expired",
        Duration::from_secs(60),
    )
    .await;
    api.assert_one_notification_each(&token, &ids, "OrderExpired", false, "OrderCompleted")
        .await;
    assert_eq!(processes.log("embedded").matches("FAKE E-MAIL").count(), 0);
    processes.stop().await;
}
