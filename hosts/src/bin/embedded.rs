//! The embedded default (`cargo run --release`): API, runner and scheduler in
//! one process, on a SQLite file under `data/` and an in-process transport.

use clap::Parser;

/// The whole system in one process (API, runner, scheduler) on SQLite and an in-process transport.
/// Configuration comes from `configuration/instance.json` and `APP__...`
/// variables (see the README), not from arguments.
#[derive(Parser)]
#[command(name = "embedded", version)]
struct Args {}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    Args::parse();
    hosts::run_host("embedded", hosts::embedded::run).await
}
