//! The HTTP API host: applies migrations, seeds the admin, serves the API and
//! Swagger UI, and relays the outbox.

use clap::Parser;

/// The HTTP API host: applies migrations, seeds the admin, serves the API and Swagger UI, and relays the outbox.
/// Configuration comes from `configuration/instance.json` and `APP__...`
/// variables (see the README), not from arguments.
#[derive(Parser)]
#[command(name = "api", version)]
struct Args {}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    Args::parse();
    hosts::run_host("api", hosts::api::run).await
}
