use std::sync::Arc;

use poem::web::Data;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};
use sea_orm::ConnectionTrait;

use super::{ApiTags, AppState};

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
}
