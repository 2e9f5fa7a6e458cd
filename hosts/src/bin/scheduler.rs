//! The scheduler host: the periodic expiration sweep and its outbox relay.

use clap::Parser;

/// The scheduler host: applies the order saga's state timeout (expiry) and relays the outbox.
/// Configuration comes from `configuration/instance.json` and `APP__...`
/// variables (see the README), not from arguments.
#[derive(Parser)]
#[command(name = "scheduler", version)]
struct Args {}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    Args::parse();
    hosts::run_host("scheduler", hosts::scheduler::run).await
}
