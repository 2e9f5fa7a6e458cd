//! The scheduler host: the periodic expiration sweep and its outbox relay.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    hosts::run_host("scheduler", hosts::scheduler::run).await
}
