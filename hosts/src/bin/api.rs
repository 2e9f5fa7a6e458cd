//! The HTTP API host: applies migrations, seeds the admin, serves the API and
//! Swagger UI, and relays the outbox.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    hosts::run_host("api", hosts::api::run).await
}
