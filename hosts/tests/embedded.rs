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
    let (processes, api, _, _) = start_with(label, success_rate, &[]).await;
    (processes, api)
}

/// Like [`start`], with extra `APP__...` overrides; also returns the
/// environment (to start the host again) and the SQLite file.
async fn start_with(
    label: &str,
    success_rate: &str,
    extra: &[(&str, &str)],
) -> (Processes, Api, Vec<(String, String)>, std::path::PathBuf) {
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
    .chain(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    )
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
    (processes, api, env, db_file)
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

/// A process killed between a commit and the publish leaves its events
/// leased to itself. The embedded host is the only process on its file, so at
/// start it releases those leases instead of waiting them out (here an hour).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_embedded_host_publishes_what_its_previous_life_had_leased_at_once() {
    use sea_orm::{ConnectionTrait, Database};
    let (mut processes, api, env, db_file) = start_with(
        "embedded-leases",
        "1",
        &[("APP__OUTBOX__LEASE_SECONDS", "3600")],
    )
    .await;
    let (token, user_id) = api.register_and_login().await;
    let ids = api.place_orders(&token, user_id, 3).await;
    api.wait_for_status(
        &mut processes,
        &token,
        &ids,
        "completed",
        Duration::from_secs(60),
    )
    .await;
    processes.kill("embedded").await;
    // As a kill -9 right after the commits would leave them: the orders'
    // OrderCompleted events unsent and leased for an hour.
    let url = format!("sqlite://{}?mode=rw", db_file.display());
    let db = Database::connect(url.as_str()).await.expect("sqlite file");
    let leased = db
        .execute_unprepared(
            "UPDATE saga_outbox SET sent_at = NULL, \
             locked_until = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '+1 hour') \
             WHERE message_type = 'OrderCompleted'",
        )
        .await
        .expect("lease the events")
        .rows_affected();
    assert_eq!(leased, 3);
    let unsent = |db: &sea_orm::DatabaseConnection| {
        let db = db.clone();
        async move {
            let row = db
                .query_one_raw(sea_orm::Statement::from_string(
                    db.get_database_backend(),
                    "SELECT count(*) AS n FROM saga_outbox WHERE sent_at IS NULL",
                ))
                .await
                .ok()??;
            row.try_get::<i64>("", "n").ok()
        }
    };
    assert_eq!(unsent(&db).await, Some(3));
    db.close().await.expect("close");
    processes.spawn("embedded", env!("CARGO_BIN_EXE_embedded"), &[], &env);
    api.wait_healthy(Duration::from_secs(60)).await;
    let db = Database::connect(url.as_str()).await.expect("sqlite file");
    eventually(
        Duration::from_secs(10),
        "the leased events published",
        || {
            let db = db.clone();
            async move { (unsent(&db).await == Some(0)).then_some(()) }
        },
    )
    .await;
    assert!(
        processes
            .log("embedded")
            .contains("outbox rows of a previous run released for publishing"),
        "the restart says it released the leases"
    );
    db.close().await.expect("close");
    processes.stop().await;
}
