use std::sync::Arc;

use poem::web::Data;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};
use sea_orm::ConnectionTrait;

use super::{ApiTags, AppState};
use crate::ops::HealthReport;

#[derive(Object)]
#[oai(example)]
pub struct HealthView {
    /// `ok` or `unavailable`.
    pub status: String,
    /// `ok` or the reason the database check failed.
    pub database: String,
}

impl poem_openapi::types::Example for HealthView {
    fn example() -> Self {
        HealthView {
            status: "ok".into(),
            database: "ok".into(),
        }
    }
}

#[derive(ApiResponse)]
pub enum HealthResponse {
    /// The service and its database are up.
    #[oai(status = 200)]
    Ok(Json<HealthView>),
    /// The database cannot be reached.
    #[oai(status = 503)]
    Unavailable(Json<HealthView>),
}

/// The answer of `/health/live` and `/health/ready`.
#[derive(ApiResponse)]
pub enum HealthReportResponse {
    /// Every check passed.
    #[oai(status = 200)]
    Ok(Json<HealthReport>),
    /// At least one check failed: `failed` names it, `checks` says why.
    #[oai(status = 503)]
    Unavailable(Json<HealthReport>),
}

impl From<HealthReport> for HealthReportResponse {
    fn from(report: HealthReport) -> Self {
        if report.is_ok() {
            HealthReportResponse::Ok(Json(report))
        } else {
            HealthReportResponse::Unavailable(Json(report))
        }
    }
}

pub struct HealthApi;

#[OpenApi]
impl HealthApi {
    /// Health check
    ///
    /// Answers 200 when the API can reach its database, 503 otherwise.
    #[oai(path = "/health", method = "get", tag = "ApiTags::Health")]
    async fn health(&self, state: Data<&Arc<AppState>>) -> HealthResponse {
        match state.db.execute_unprepared("SELECT 1").await {
            Ok(_) => HealthResponse::Ok(Json(HealthView {
                status: "ok".into(),
                database: "ok".into(),
            })),
            Err(e) => {
                tracing::warn!(error = %e, "health check: database unreachable");
                HealthResponse::Unavailable(Json(HealthView {
                    status: "unavailable".into(),
                    database: "unreachable".into(),
                }))
            }
        }
    }

    /// Liveness
    ///
    /// 200 while every loop of this process (the outbox relay; in the
    /// embedded host also the consumers, timers and sweeps) is running; 503
    /// when one has stopped: restart the process. `checks` lists each loop.
    #[oai(path = "/health/live", method = "get", tag = "ApiTags::Health")]
    async fn live(&self, state: Data<&Arc<AppState>>) -> HealthReportResponse {
        state.monitor.live().into()
    }

    /// Readiness
    ///
    /// 200 when the database answers, the broker connection is open, every
    /// consumer is registered and not stalled (embedded host), and the oldest
    /// unsent outbox event is younger than `monitoring.outbox_lag_max_seconds`;
    /// otherwise 503, with `failed` naming the failed checks and `checks`
    /// saying what each one found.
    #[oai(path = "/health/ready", method = "get", tag = "ApiTags::Health")]
    async fn ready(&self, state: Data<&Arc<AppState>>) -> HealthReportResponse {
        let report = state.monitor.ready().await;
        if !report.is_ok() {
            tracing::debug!(failed = ?report.failed, "not ready");
        }
        report.into()
    }
}
