//! Prometheus metrics for every host: one recorder per process (the
//! `metrics` facade's global recorder, installed on first use), rendered
//! into our own `/metrics` endpoints (the API's, and the runner's and
//! scheduler's monitoring listener); plus the HTTP middleware that counts
//! API requests by route template and status.
//!
//! The library records its own metrics (see `saga::metrics`); this module
//! adds the HTTP ones and, at each scrape, refreshes the database-wide
//! backlog gauges (saga instances by type and state, parked instances,
//! orders by status, outbox backlog and lag, timers).

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use poem::PathPattern;
use poem::{Endpoint, IntoResponse, Request, Response};
use saga::clock::Clock;
use sea_orm::DatabaseConnection;

/// Counter: HTTP requests by `method`, `route` (the router's template, e.g.
/// `/api/orders/:param0` for `/api/orders/{id}`; `unmatched` when no route
/// matched) and `status`.
pub const HTTP_REQUESTS: &str = "http_requests_total";
/// Histogram (seconds): HTTP request latency, same labels.
pub const HTTP_DURATION: &str = "http_request_duration_seconds";
/// Counter: statements this process ran on the database (each one round
/// trip; transaction begin and commit not included).
pub const DB_STATEMENTS: &str = "db_statements_total";
/// Counter: scrapes whose backlog query failed (the gauges then keep their
/// last values).
pub const BACKLOG_ERRORS: &str = "saga_backlog_refresh_errors_total";

/// Histogram buckets (seconds) for every histogram: latency and lateness.
const BUCKETS: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The process's Prometheus handle, installing the recorder on first use.
/// If another recorder is installed already (only possible in tests that
/// install their own), metrics are rendered from a detached recorder that
/// records nothing, and a warning is logged.
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = match PrometheusBuilder::new().set_buckets(&BUCKETS) {
            Ok(builder) => builder,
            Err(e) => {
                tracing::warn!(error = %e, "histogram buckets refused; using summaries");
                PrometheusBuilder::new()
            }
        };
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        match metrics::set_global_recorder(recorder) {
            Ok(()) => {
                saga::metrics::describe();
                orders::metrics::describe();
                crate::transport::describe_metrics();
                metrics::describe_counter!(
                    HTTP_REQUESTS,
                    "HTTP requests by method, route template and status"
                );
                metrics::describe_histogram!(
                    HTTP_DURATION,
                    metrics::Unit::Seconds,
                    "HTTP request latency by method, route template and status"
                );
                metrics::describe_counter!(
                    DB_STATEMENTS,
                    "Statements this process ran on the database (round trips; BEGIN and COMMIT not included)"
                );
                metrics::describe_counter!(
                    BACKLOG_ERRORS,
                    "Scrapes whose backlog query failed (gauges keep their last values)"
                );
                crate::api::placement::describe_metrics();
            }
            Err(e) => tracing::warn!(error = %e, "a metrics recorder was installed already"),
        }
        handle
    })
}

/// Refreshes the backlog gauges from `db` at `clock.now()` and renders
/// every metric in the Prometheus text format.
pub async fn render(db: &DatabaseConnection, clock: &Arc<dyn Clock>) -> String {
    let handle = handle();
    let known = [saga::metrics::KnownSaga::of::<orders::OrderSaga>()];
    let read = async {
        let backlog = saga::metrics::backlog(db, clock.now(), &known).await?;
        let orders = orders::metrics::orders_by_status(db).await?;
        Ok::<_, saga::SagaError>((backlog, orders))
    };
    match read.await {
        Ok((backlog, orders)) => {
            saga::metrics::record_backlog(&backlog);
            orders::metrics::record(&orders);
        }
        Err(e) => {
            metrics::counter!(BACKLOG_ERRORS).increment(1);
            tracing::warn!(error = %e, "metrics: could not read the backlog");
        }
    }
    handle.run_upkeep();
    handle.render()
}

/// The `/metrics` response: text format 0.0.4.
pub fn response(body: String) -> Response {
    Response::builder()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(body)
}

/// Where the innermost matched route template is passed out to [`track`]
/// (error handlers replace responses and lose poem's own `PathPattern`).
#[derive(Clone, Default)]
struct RouteSlot(Arc<Mutex<Option<Arc<str>>>>);

/// Outermost middleware: counts each request by method, route template and
/// final status, with its latency.
pub async fn track<E: Endpoint>(next: E, mut req: Request) -> poem::Result<Response> {
    let started = Instant::now();
    // Clients may send any method name: keep the label set bounded.
    let method = match req.method().as_str() {
        m @ ("GET" | "POST" | "PUT" | "DELETE" | "PATCH" | "HEAD" | "OPTIONS") => m,
        _ => "other",
    }
    .to_owned();
    let slot = RouteSlot::default();
    req.set_data(slot.clone());
    let result = next.call(req).await;
    let (status, result) = match result {
        Ok(output) => {
            let response = output.into_response();
            (response.status().as_u16(), Ok(response))
        }
        Err(e) => (e.status().as_u16(), Err(e)),
    };
    let route = slot
        .0
        .lock()
        .ok()
        .and_then(|r| r.clone())
        .map_or_else(|| "unmatched".to_owned(), |r| r.to_string());
    let labels = [
        ("method", method),
        ("route", route),
        ("status", status.to_string()),
    ];
    metrics::counter!(HTTP_REQUESTS, &labels).increment(1);
    metrics::histogram!(HTTP_DURATION, &labels).record(started.elapsed().as_secs_f64());
    result
}

/// Innermost middleware (on the router): hands the matched route template
/// to [`track`].
pub async fn route_of<E: Endpoint>(next: E, req: Request) -> poem::Result<Response> {
    let slot = req.data::<RouteSlot>().cloned();
    let result = next.call(req).await.map(IntoResponse::into_response);
    if let Some(slot) = slot {
        let pattern = match &result {
            Ok(response) => response.data::<PathPattern>().cloned(),
            Err(e) => e.data::<PathPattern>().cloned(),
        };
        if let (Some(pattern), Ok(mut stored)) = (pattern, slot.0.lock()) {
            *stored = Some(pattern.0);
        }
    }
    result
}
