//! The HTTP API (poem + poem-openapi): Swagger UI at `/swagger`, the spec at
//! `/openapi.json`.

use std::sync::Arc;
use std::time::Duration;

use ::orders::OrderSaga;
use anyhow::Context;
use chrono::Utc;
use entity::users as user_entity;
use migration::{Migrator, MigratorTrait};
use poem::endpoint::make_sync;
use poem::listener::TcpListener;
use poem::middleware::Cors;
use poem::web::Html;
use poem::{Endpoint, EndpointExt, Response, Route, Server, get};
use poem_openapi::{OpenApiService, Tags};
use saga::clock::{Clock, SystemClock};
use saga::engine::SagaEngine;
use sea_orm::sea_query::{OnConflict, Query};
use sea_orm::{ConnectionTrait, DatabaseConnection};
use tokio_util::sync::CancellationToken;

use crate::infra;
use crate::settings::Settings;

pub mod auth;
pub mod guard;
mod headers;
mod health;
mod money;
mod notifications;
mod orders;
pub mod placement;
pub mod problem;
mod products;
pub mod ratelimit;
mod sagas;
pub(crate) mod users;

#[derive(Tags)]
pub enum ApiTags {
    /// Registration, login and the caller's account.
    Users,
    /// The product catalogue.
    Products,
    /// Orders, their journal and their audit notifications.
    Orders,
    /// The audit notifications written when orders change (read-only).
    Notifications,
    /// The order saga's state machine, as a diagram and a table.
    Sagas,
    /// Liveness of the service.
    Health,
}

/// Everything a request handler needs.
pub struct AppState {
    pub db: DatabaseConnection,
    pub jwt: auth::JwtKeys,
    pub clock: Arc<dyn Clock>,
    /// The order saga's engine (placing an order starts its saga; its
    /// outbox handle reaches this process's relay).
    pub orders: SagaEngine<OrderSaga>,
    pub login_limiter: ratelimit::LoginLimiter,
    /// Places orders: concurrent requests share a transaction.
    pub placer: placement::Placer,
    /// Largest request body (bytes).
    pub body_limit: usize,
    /// CORS origins; empty means no CORS headers.
    pub cors_allowed_origins: Vec<String>,
    /// Health checks and `/metrics` (database and outbox only, until the
    /// host adds its broker and loops).
    pub monitor: Arc<crate::ops::Monitor>,
    /// The operator console's sagas, queues and session settings (no
    /// broker and no peers until the host adds them).
    pub console: Arc<crate::console::Console>,
}

impl AppState {
    /// The state for `settings`, on the system clock. Refuses a JWT signing
    /// key shorter than 256 bits.
    pub fn new(db: DatabaseConnection, settings: &Settings) -> anyhow::Result<Self> {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let orders =
            crate::infra::engine(settings, db.clone(), crate::infra::outbox_handle(settings));
        Ok(Self {
            monitor: Arc::new(crate::ops::Monitor::new(db.clone(), clock, settings)),
            console: Arc::new(crate::console::Console::new(
                settings,
                crate::infra::sagas(&orders),
            )),
            placer: placement::Placer::for_settings(orders.clone(), settings),
            orders,
            db,
            jwt: auth::JwtKeys::new(&settings.auth)?,
            clock: Arc::new(SystemClock),
            login_limiter: ratelimit::LoginLimiter::new(&settings.auth),
            body_limit: settings.api.body_limit_bytes,
            cors_allowed_origins: settings.api.cors_allowed_origins.clone(),
        })
    }
}

/// Every API group, in the order the spec lists them.
pub type Apis = (
    users::UsersApi,
    products::ProductsApi,
    orders::OrdersApi,
    notifications::NotificationsApi,
    sagas::SagasApi,
    health::HealthApi,
);

/// The OpenAPI service. No `servers` entry: Swagger UI calls the origin it
/// was loaded from, whatever host name the user typed.
pub fn openapi() -> OpenApiService<Apis, ()> {
    OpenApiService::new(
        (
            users::UsersApi,
            products::ProductsApi,
            orders::OrdersApi,
            notifications::NotificationsApi,
            sagas::SagasApi,
            health::HealthApi,
        ),
        "order-saga API",
        env!("CARGO_PKG_VERSION"),
    )
    .description(
        "Create orders and watch them go pending -> processing -> completed | expired. \
         Register (`POST /api/users`), log in (`POST /api/auth/login`), press **Authorize** \
         and paste the token.\n\n\
         Errors are RFC 9457 problem details (`application/problem+json`). Request bodies \
         are JSON, at most 64 KiB (413 above), and unknown fields are rejected (400).",
    )
}

/// Request bodies declared `deny_unknown_fields`: the spec says so with
/// `additionalProperties: false` (poem-openapi does not write it).
pub const CLOSED_SCHEMAS: [&str; 5] = [
    "RegisterRequest",
    "LoginRequest",
    "CreateOrderRequest",
    "OrderItemRequest",
    "ProductRequest",
];

/// The spec as JSON (what `/openapi.json` serves and Swagger UI shows).
pub fn spec_json() -> String {
    complete_spec(&openapi().spec())
}

/// Operations only admins may call (403 for everyone else).
pub const ADMIN_OPERATIONS: [(&str, &str); 4] = [
    ("get", "/api/users"),
    ("post", "/api/products"),
    ("put", "/api/products/{id}"),
    ("delete", "/api/products/{id}"),
];

/// Whether an operation can answer an error `status`. Every operation
/// shares one error type; the spec lists only the statuses that can occur.
fn answers(method: &str, path: &str, op: &serde_json::Value, status: &str) -> bool {
    let has_body = op.get("requestBody").is_some();
    let secured = op.get("security").is_some();
    let login = (method, path) == ("post", "/api/auth/login");
    match status {
        "401" => secured || login,
        "403" => ADMIN_OPERATIONS.contains(&(method, path)),
        "404" => path.contains('{'),
        "409" => (has_body && !login) || method == "delete",
        "413" | "415" => has_body,
        "422" => has_body && (path.starts_with("/api/orders") || path.starts_with("/api/products")),
        "429" => login,
        _ => true,
    }
}

fn complete_spec(generated: &str) -> String {
    let Ok(mut spec) = serde_json::from_str::<serde_json::Value>(generated) else {
        return generated.to_owned();
    };
    if let Some(paths) = spec.get_mut("paths").and_then(|p| p.as_object_mut()) {
        for (path, item) in paths.iter_mut() {
            let Some(ops) = item.as_object_mut() else {
                continue;
            };
            for (method, op) in ops.iter_mut() {
                let snapshot = op.clone();
                if let Some(responses) = op.get_mut("responses").and_then(|r| r.as_object_mut()) {
                    responses.retain(|status, _| answers(method, path, &snapshot, status));
                }
            }
        }
    }
    for name in CLOSED_SCHEMAS {
        if let Some(schema) = spec["components"]["schemas"]
            .get_mut(name)
            .and_then(|s| s.as_object_mut())
        {
            schema.insert("additionalProperties".into(), false.into());
        }
    }
    serde_json::to_string_pretty(&spec).unwrap_or_else(|_| generated.to_owned())
}

/// The whole HTTP application (used by the host and by in-process tests).
pub fn app(state: Arc<AppState>) -> impl Endpoint + 'static {
    let api = openapi();
    let generated = api.spec();
    let spec = Arc::new(complete_spec(&generated));
    // Swagger UI embeds the spec: give it the completed one.
    let ui_html = Arc::new(api.swagger_ui_html().replace(&generated, &spec));
    let spec_endpoint = make_sync(move |_| {
        Response::builder()
            .content_type("application/json; charset=utf-8")
            .body(spec.as_str().to_owned())
    });
    let ui_html_slash = ui_html.clone();
    let ui = make_sync(move |_| Html(ui_html.as_str().to_owned()));
    let ui_slash = make_sync(move |_| Html(ui_html_slash.as_str().to_owned()));
    let guard_settings = Arc::new(guard::GuardSettings {
        body_limit: state.body_limit,
        allow: guard::AllowTable::from_spec(&generated),
    });
    let cors = Cors::new()
        .allow_origins(state.cors_allowed_origins.clone())
        .allow_methods([
            poem::http::Method::GET,
            poem::http::Method::POST,
            poem::http::Method::PUT,
            poem::http::Method::DELETE,
        ])
        .allow_headers(["authorization", "content-type", "idempotency-key"])
        .expose_headers(["retry-after", "location"])
        .max_age(600);
    let use_cors = !state.cors_allowed_origins.is_empty();
    let monitor = state.monitor.clone();
    // Not in the spec: Prometheus text, scraped by machines.
    let metrics_endpoint = poem::endpoint::make(move |_| {
        let monitor = monitor.clone();
        async move { crate::metrics::response(monitor.metrics().await) }
    });
    Route::new()
        .nest("/", api)
        // Not in the spec: the operator console's pages and JSON.
        .nest("/console", crate::console::routes())
        .at("/openapi.json", get(spec_endpoint))
        .at("/swagger", get(ui))
        .at("/swagger/", get(ui_slash))
        .at("/metrics", get(metrics_endpoint))
        .around(crate::metrics::route_of)
        .data(state)
        .catch_all_error(problem::render_error)
        .around(move |next, req| guard::guard(next, req, guard_settings.clone()))
        .with_if(use_cors, cors)
        .around(crate::metrics::track)
        .around(crate::telemetry::http::trace_request)
}

/// Inserts the configured admin if no user has that e-mail (idempotent).
pub async fn seed_admin<C: ConnectionTrait>(db: &C, settings: &Settings) -> anyhow::Result<()> {
    let hash = auth::hash_password(settings.seed.admin_password.expose().to_owned()).await?;
    use user_entity::Column as U;
    let mut insert = Query::insert();
    insert
        .into_table(user_entity::Entity)
        .columns([U::Name, U::Email, U::PasswordHash, U::Role, U::CreatedAt])
        .values([
            settings.seed.admin_name.clone().into(),
            settings.seed.admin_email.to_lowercase().into(),
            hash.into(),
            "admin".into(),
            Utc::now().into(),
        ])
        .context("admin seed row")?
        .on_conflict(OnConflict::column(U::Email).do_nothing().to_owned());
    let inserted = db.execute(&insert).await?.rows_affected();
    if inserted == 1 {
        tracing::info!(email = %settings.seed.admin_email, "seeded the admin user");
    }
    Ok(())
}

/// Runs the API host until `shutdown` fires.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let db = infra::connect_database(&settings).await?;
    Migrator::up(&db, None)
        .await
        .context("Failed to apply database migrations")?;
    tracing::info!("database schema is up to date");
    seed_admin(&db, &settings).await?;

    crate::metrics::handle();
    let broker_slot = Arc::new(std::sync::OnceLock::new());
    let mut state = AppState::new(db.clone(), &settings)?;
    let monitor = Arc::new(
        crate::ops::Monitor::new(db.clone(), state.clock.clone(), &settings)
            .with_broker(crate::ops::Broker::Remote(broker_slot.clone()))
            .with_shutdown(shutdown.clone()),
    );
    state.monitor = monitor.clone();
    state.console = Arc::new(
        crate::console::Console::new(&settings, infra::sagas(&state.orders))
            .with_broker(crate::operator::Broker::Remote(broker_slot.clone()))
            .with_queue_prefix(settings.queue_prefix())
            .with_peers(&settings),
    );
    let outbox = state.orders.outbox().clone();
    let state = Arc::new(state);

    // The relay publishes what orders wrote to the outbox. It connects in the
    // background: the API serves (and the outbox keeps events) while the
    // broker is away.
    let relay_settings = settings.clone();
    let relay_shutdown = shutdown.clone();
    let relay_loops = monitor.loops().clone();
    let relay_task = tokio::spawn(async move {
        relay_loops.run("outbox relay", async move {
        loop {
            // Stop trying to connect as soon as the host is asked to stop.
            let connected = tokio::select! {
                _ = relay_shutdown.cancelled() => return,
                connected = crate::transport::HostTransport::connect(&relay_settings, "order-saga api relay") => connected,
            };
            match connected {
                Ok(transport) => {
                    let _ = broker_slot.set(transport.clone());
                    let relay =
                        infra::relay(&relay_settings, db.clone(), &transport, outbox);
                    relay.run_until_stopped(relay_shutdown.clone()).await;
                    transport.close().await;
                    return;
                }
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "outbox relay cannot reach the broker; retrying");
                    tokio::select! {
                        _ = relay_shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    }
                }
            }
        }
        })
        .await
    });

    // Expired idempotency keys go away in the background (not on the
    // request path).
    let purge = tokio::spawn(orders::purge_expired_keys_until_stopped(
        state.db.clone(),
        state.clock.clone(),
        Duration::from_secs(600),
        shutdown.clone(),
    ));
    let listener = TcpListener::bind(settings.api.listen.clone());
    tracing::info!(
        listen = %settings.api.listen,
        "API listening; Swagger UI at {}/swagger, spec at {}/openapi.json, operator console at {}/console",
        settings.api.public_url,
        settings.api.public_url,
        settings.api.public_url
    );
    let app = app(state);
    let stop = shutdown.clone();
    Server::new(listener)
        .run_with_graceful_shutdown(
            app,
            async move { stop.cancelled().await },
            Some(Duration::from_secs(10)),
        )
        .await
        .context("HTTP server failed")?;
    shutdown.cancel();
    let _ = relay_task.await;
    let _ = purge.await;
    tracing::info!("API stopped");
    Ok(())
}
