//! Health that tells the truth, and the monitoring listener of the runner
//! and the scheduler (`monitoring.runner_listen` / `scheduler_listen`):
//! `GET /metrics`, `GET /health/live`, `GET /health/ready`. The api and the
//! embedded host serve the same three on their own HTTP port.
//!
//! - **Live** (`/health/live`): every loop this process runs (consumers,
//!   timers, relay, sweeps) is still running. A loop that returned or
//!   panicked while the host is not shutting down makes the process dead:
//!   restart it.
//! - **Ready** (`/health/ready`): the database answers; the broker
//!   connection is open (re-established on the spot if it can be); every
//!   consumer is registered on the broker and not stalled (holding one
//!   delivery unfinished for longer than `monitoring.consumer_stall_seconds`);
//!   the oldest unsent outbox event is younger than
//!   `monitoring.outbox_lag_max_seconds`.
//!
//! Both answer 200 or 503 with a JSON body naming each check, whether it
//! passed and why ([`HealthReport`]).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use poem::listener::TcpAcceptor;
use poem::web::Data;
use poem::{EndpointExt, Response, Route, Server, get, handler};
use saga::clock::Clock;
use saga::transport::QueueSpec;
use saga::transport::status::{ConsumerRegistry, ConsumerSnapshot};
use sea_orm::{ConnectionTrait, DatabaseConnection};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::settings::Settings;
use crate::transport::HostTransport;

/// How long one check may take before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// One named check and its result.
#[derive(Clone, Debug, Serialize, poem_openapi::Object)]
#[oai(example)]
pub struct Check {
    /// `database`, `broker`, `consumer:<name>`, `outbox_lag` or `loop:<name>`.
    pub name: String,
    /// Whether the check passed.
    pub ok: bool,
    /// What was found, e.g. `reachable`, or why it failed.
    pub detail: String,
}

/// The body of `/health/live` and `/health/ready`.
#[derive(Clone, Debug, Serialize, poem_openapi::Object)]
#[oai(example)]
pub struct HealthReport {
    /// `ok` when every check passed, else `unavailable`.
    pub status: String,
    /// Names of the checks that failed (empty when `ok`).
    pub failed: Vec<String>,
    /// Every check, passed or not.
    pub checks: Vec<Check>,
}

impl poem_openapi::types::Example for Check {
    fn example() -> Self {
        Check {
            name: "database".into(),
            ok: true,
            detail: "reachable".into(),
        }
    }
}

impl poem_openapi::types::Example for HealthReport {
    fn example() -> Self {
        HealthReport::from_checks(vec![
            Check {
                name: "database".into(),
                ok: true,
                detail: "reachable".into(),
            },
            Check {
                name: "broker".into(),
                ok: false,
                detail: "not connected: connection refused".into(),
            },
            Check {
                name: "outbox_lag".into(),
                ok: true,
                detail: "0 unsent".into(),
            },
        ])
    }
}

impl HealthReport {
    /// `ok` only if every check passed.
    pub fn from_checks(checks: Vec<Check>) -> Self {
        let failed: Vec<String> = checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| c.name.clone())
            .collect();
        HealthReport {
            status: if failed.is_empty() {
                "ok"
            } else {
                "unavailable"
            }
            .to_owned(),
            failed,
            checks,
        }
    }

    pub fn is_ok(&self) -> bool {
        self.failed.is_empty()
    }
}

/// The loops a process runs, for liveness.
#[derive(Clone, Debug, Default)]
pub struct Loops {
    inner: Arc<Mutex<BTreeMap<String, LoopState>>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LoopState {
    Running,
    Stopped,
}

/// Marks its loop stopped when dropped: returned, panicked or cancelled.
struct LoopGuard {
    loops: Loops,
    name: String,
}

impl Drop for LoopGuard {
    fn drop(&mut self) {
        self.loops.set(&self.name, LoopState::Stopped);
    }
}

impl Loops {
    fn set(&self, name: &str, state: LoopState) {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(name.to_owned(), state);
    }

    /// Runs `work` as the loop `name`: live while it runs.
    pub async fn run<F: Future>(&self, name: &str, work: F) -> F::Output {
        self.set(name, LoopState::Running);
        let _guard = LoopGuard {
            loops: self.clone(),
            name: name.to_owned(),
        };
        work.await
    }

    /// One check per loop.
    pub fn checks(&self) -> Vec<Check> {
        let map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .map(|(name, state)| Check {
                name: format!("loop:{name}"),
                ok: *state == LoopState::Running,
                detail: match state {
                    LoopState::Running => "running".into(),
                    LoopState::Stopped => "stopped".into(),
                },
            })
            .collect()
    }
}

/// How the broker is reached, for the `broker` check.
#[derive(Clone)]
pub enum Broker {
    /// No broker check (a process that publishes nothing).
    None,
    /// The embedded host's in-process transport: always there.
    InProcess,
    /// RabbitMQ or Kafka; empty until the host has connected (the api
    /// connects its relay in the background).
    Remote(Arc<OnceLock<HostTransport>>),
}

impl Broker {
    /// A check on an already connected transport.
    pub fn connected(transport: HostTransport) -> Self {
        let slot = OnceLock::new();
        let _ = slot.set(transport);
        Broker::Remote(Arc::new(slot))
    }
}

/// Everything the health checks and `/metrics` look at.
pub struct Monitor {
    db: DatabaseConnection,
    clock: Arc<dyn Clock>,
    broker: Broker,
    /// Consumers that must be registered, and where their state is.
    consumers: Vec<String>,
    registry: Option<ConsumerRegistry>,
    /// Kafka: the queues whose consumer lag `/metrics` reports.
    lag_queues: Vec<(String, QueueSpec)>,
    loops: Loops,
    outbox_lag_max: Duration,
    consumer_stall: Duration,
    /// Set while the host shuts down: stopped loops are expected then.
    stopping: CancellationToken,
}

impl Monitor {
    /// A monitor of `db` with the bounds from `settings.monitoring`; add
    /// the broker, consumers and loops with the `with_*` methods.
    pub fn new(db: DatabaseConnection, clock: Arc<dyn Clock>, settings: &Settings) -> Self {
        Monitor {
            db,
            clock,
            broker: Broker::None,
            consumers: Vec::new(),
            registry: None,
            lag_queues: Vec::new(),
            loops: Loops::default(),
            outbox_lag_max: Duration::from_secs(settings.monitoring.outbox_lag_max_seconds),
            consumer_stall: Duration::from_secs(settings.monitoring.consumer_stall_seconds),
            stopping: CancellationToken::new(),
        }
    }

    pub fn with_broker(mut self, broker: Broker) -> Self {
        self.broker = broker;
        self
    }

    /// `names` must be registered on the broker and not stalled; `registry`
    /// is the transport's ([`saga::transport::Transport::consumer_status`]).
    pub fn with_consumers(mut self, registry: Option<ConsumerRegistry>, names: &[&str]) -> Self {
        self.registry = registry;
        self.consumers = names.iter().map(|n| (*n).to_owned()).collect();
        self
    }

    /// `/metrics` reports the consumer lag of these (consumer name, queue)
    /// when the broker is Kafka.
    pub fn with_lag_of(mut self, queues: Vec<(String, QueueSpec)>) -> Self {
        self.lag_queues = queues;
        self
    }

    /// Stopped loops do not count against liveness once `stopping` fired.
    pub fn with_shutdown(mut self, stopping: CancellationToken) -> Self {
        self.stopping = stopping;
        self
    }

    pub fn loops(&self) -> &Loops {
        &self.loops
    }

    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// `/health/live`.
    pub fn live(&self) -> HealthReport {
        let mut checks = self.loops.checks();
        if self.stopping.is_cancelled() {
            for check in &mut checks {
                if !check.ok {
                    check.ok = true;
                    check.detail = "stopped (shutting down)".into();
                }
            }
        }
        HealthReport::from_checks(checks)
    }

    /// `/health/ready`.
    pub async fn ready(&self) -> HealthReport {
        let mut checks = vec![self.database_check().await];
        if let Some(check) = self.broker_check().await {
            checks.push(check);
        }
        let now = Instant::now();
        for name in &self.consumers {
            checks.push(self.consumer_check(name, now));
        }
        checks.push(self.outbox_check().await);
        HealthReport::from_checks(checks)
    }

    /// `/metrics`.
    pub async fn metrics(&self) -> String {
        if let Broker::Remote(slot) = &self.broker
            && let Some(transport) = slot.get()
            && !self.lag_queues.is_empty()
        {
            let read = crate::transport::record_kafka_lag(transport, &self.lag_queues);
            if tokio::time::timeout(CHECK_TIMEOUT, read).await.is_err() {
                metrics::counter!(crate::transport::KAFKA_LAG_ERRORS, "consumer" => "all")
                    .increment(1);
                tracing::warn!(
                    "metrics: the Kafka consumer lag was not read within {CHECK_TIMEOUT:?}"
                );
            }
        }
        crate::metrics::render(&self.db, &self.clock).await
    }

    async fn database_check(&self) -> Check {
        let answer = tokio::time::timeout(CHECK_TIMEOUT, self.db.execute_unprepared("SELECT 1"));
        let (ok, detail) = match answer.await {
            Ok(Ok(_)) => (true, "reachable".to_owned()),
            Ok(Err(e)) => (false, format!("unreachable: {e}")),
            Err(_) => (
                false,
                format!("no answer within {} s", CHECK_TIMEOUT.as_secs()),
            ),
        };
        Check {
            name: "database".into(),
            ok,
            detail,
        }
    }

    async fn broker_check(&self) -> Option<Check> {
        let (ok, detail) = match &self.broker {
            Broker::None => return None,
            Broker::InProcess => (true, "in-process transport".to_owned()),
            Broker::Remote(slot) => match slot.get() {
                None => (false, "not connected yet".to_owned()),
                Some(transport) => {
                    match tokio::time::timeout(CHECK_TIMEOUT, transport.check()).await {
                        Ok(Ok(detail)) => (true, detail),
                        Ok(Err(detail)) => (false, detail),
                        Err(_) => (
                            false,
                            format!(
                                "not connected: no connection within {} s",
                                CHECK_TIMEOUT.as_secs()
                            ),
                        ),
                    }
                }
            },
        };
        Some(Check {
            name: "broker".into(),
            ok,
            detail,
        })
    }

    fn consumer_check(&self, name: &str, now: Instant) -> Check {
        let snapshot = self.registry.as_ref().and_then(|r| r.snapshot(name, now));
        consumer_check(name, snapshot, self.consumer_stall)
    }

    async fn outbox_check(&self) -> Check {
        let read = tokio::time::timeout(CHECK_TIMEOUT, saga::metrics::outbox_backlog(&self.db));
        let (ok, detail) = match read.await {
            Ok(Ok((unsent, oldest))) => {
                let lag = oldest
                    .map(|t| (self.clock.now() - t).to_std().unwrap_or(Duration::ZERO))
                    .unwrap_or(Duration::ZERO);
                let detail = match oldest {
                    None => "0 unsent".to_owned(),
                    Some(_) => format!(
                        "{unsent} unsent, oldest {:.1} s (limit {} s)",
                        lag.as_secs_f64(),
                        self.outbox_lag_max.as_secs()
                    ),
                };
                (lag <= self.outbox_lag_max, detail)
            }
            Ok(Err(e)) => (false, format!("cannot read the outbox: {e}")),
            Err(_) => (
                false,
                format!(
                    "cannot read the outbox within {} s",
                    CHECK_TIMEOUT.as_secs()
                ),
            ),
        };
        Check {
            name: "outbox_lag".into(),
            ok,
            detail,
        }
    }
}

/// The `consumer:<name>` check: registered on the broker and not stalled.
fn consumer_check(name: &str, snapshot: Option<ConsumerSnapshot>, stall: Duration) -> Check {
    let (ok, detail) = match snapshot {
        None => (false, "not subscribed yet".to_owned()),
        Some(s) if !s.registered => (
            false,
            format!(
                "not registered on the broker{}: {}",
                s.for_duration
                    .map(|d| format!(" for {:.1} s", d.as_secs_f64()))
                    .unwrap_or_default(),
                s.reason.as_deref().unwrap_or("unknown reason")
            ),
        ),
        Some(s) if s.stalled(stall) => (
            false,
            format!(
                "stalled: holding a delivery unfinished for {:.0} s (limit {} s); {} in flight",
                s.oldest_in_flight.unwrap_or_default().as_secs_f64(),
                stall.as_secs(),
                s.in_flight
            ),
        ),
        Some(s) => (
            true,
            format!(
                "registered; {} in flight, {} settled",
                s.in_flight, s.finished
            ),
        ),
    };
    Check {
        name: format!("consumer:{name}"),
        ok,
        detail,
    }
}

/// A health report as an HTTP response: 200 when ok, else 503.
pub fn report_response(report: &HealthReport) -> Response {
    let status = if report.is_ok() {
        poem::http::StatusCode::OK
    } else {
        poem::http::StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::to_string(report).unwrap_or_else(|_| "{}".to_owned());
    Response::builder()
        .status(status)
        .content_type("application/json; charset=utf-8")
        .body(body)
}

#[handler]
async fn metrics_endpoint(monitor: Data<&Arc<Monitor>>) -> Response {
    crate::metrics::response(monitor.metrics().await)
}

#[handler]
fn live_endpoint(monitor: Data<&Arc<Monitor>>) -> Response {
    report_response(&monitor.live())
}

#[handler]
async fn ready_endpoint(monitor: Data<&Arc<Monitor>>) -> Response {
    let report = monitor.ready().await;
    if !report.is_ok() {
        tracing::debug!(failed = ?report.failed, "not ready");
    }
    report_response(&report)
}

/// The monitoring routes (also what the listener serves).
pub fn routes(monitor: Arc<Monitor>) -> impl poem::Endpoint<Output = Response> + 'static {
    Route::new()
        .at("/metrics", get(metrics_endpoint))
        .at("/health/live", get(live_endpoint))
        .at("/health/ready", get(ready_endpoint))
        .data(monitor)
        .map_to_response()
}

/// A bound monitoring listener, ready to serve.
pub struct Listener {
    acceptor: TcpAcceptor,
    pub address: std::net::SocketAddr,
}

/// Binds `listen` (`key` names the setting in the error), so a taken port
/// stops the host at start instead of leaving it unobservable.
pub async fn bind(listen: &str, key: &str) -> anyhow::Result<Listener> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("Failed to listen on {key} = {listen}"))?;
    let address = listener.local_addr().context("listener address")?;
    let acceptor = TcpAcceptor::from_tokio(listener).context("listener")?;
    Ok(Listener { acceptor, address })
}

/// Serves [`routes`] on `listener` until `shutdown`.
pub async fn serve(
    listener: Listener,
    monitor: Arc<Monitor>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    tracing::info!(listen = %listener.address, "monitoring: /metrics, /health/live, /health/ready");
    Server::new_with_acceptor(listener.acceptor)
        .run_with_graceful_shutdown(
            routes(monitor),
            async move { shutdown.cancelled().await },
            Some(Duration::from_secs(2)),
        )
        .await
        .context("monitoring listener failed")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_is_ok_only_when_every_check_passed_and_names_the_failures() {
        let check = |name: &str, ok: bool| Check {
            name: name.into(),
            ok,
            detail: String::new(),
        };
        let ok = HealthReport::from_checks(vec![check("database", true)]);
        assert!(ok.is_ok());
        assert_eq!(ok.status, "ok");
        let bad = HealthReport::from_checks(vec![
            check("database", true),
            check("broker", false),
            check("consumer:notifications", false),
        ]);
        assert!(!bad.is_ok());
        assert_eq!(bad.status, "unavailable");
        assert_eq!(bad.failed, ["broker", "consumer:notifications"]);
    }

    #[test]
    fn a_consumer_fails_its_check_when_unregistered_or_holding_a_delivery_too_long() {
        let stall = Duration::from_secs(60);
        let registry = ConsumerRegistry::new();
        let t0 = Instant::now();
        let at = |secs| t0 + Duration::from_secs(secs);
        let check = |now| consumer_check("order-saga", registry.snapshot("order-saga", now), stall);

        let never = check(t0);
        assert!(!never.ok);
        assert_eq!(never.name, "consumer:order-saga");
        assert_eq!(never.detail, "not subscribed yet");

        registry.registered("order-saga", t0);
        let held = registry.taken("order-saga", at(1));
        let busy = check(at(61));
        assert!(busy.ok, "{busy:?}");
        assert_eq!(busy.detail, "registered; 1 in flight, 0 settled");
        let stalled = check(at(62));
        assert!(!stalled.ok);
        assert!(
            stalled
                .detail
                .starts_with("stalled: holding a delivery unfinished for 61 s (limit 60 s)"),
            "{stalled:?}"
        );
        drop(held);
        assert!(check(at(62)).ok);

        registry.lost("order-saga", "the broker cancelled the consumer", at(70));
        let lost = check(at(72));
        assert!(!lost.ok);
        assert_eq!(
            lost.detail,
            "not registered on the broker for 2.0 s: the broker cancelled the consumer"
        );
    }

    #[tokio::test]
    async fn a_loop_is_live_while_it_runs_and_dead_after_it_returns() {
        let loops = Loops::default();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn({
            let loops = loops.clone();
            async move { loops.run("timers", async move { rx.await.ok() }).await }
        });
        saga::testing::eventually(Duration::from_secs(5), "the loop to start", || {
            let checks = loops.checks();
            async move { (checks.len() == 1 && checks[0].ok).then_some(()) }
        })
        .await;
        assert_eq!(loops.checks()[0].name, "loop:timers");
        tx.send(()).expect("loop waiting");
        running.await.expect("loop ended");
        let checks = loops.checks();
        assert!(!checks[0].ok);
        assert_eq!(checks[0].detail, "stopped");
    }
}
