//! The saga runner host: consumers, durable timers and the outbox relay.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    hosts::run_host("runner", hosts::runner::run).await
}
