//! The saga runner host: consumers, durable timers and the outbox relay; and
//! the operator commands `parked`, `resume` and `redrive` (see `runner help`).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = match hosts::runner::Command::parse(&args) {
        Ok(command) => command,
        Err(e) => {
            hosts::telemetry::init("error");
            tracing::error!("{e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    hosts::run_host("runner", move |settings, shutdown| {
        hosts::runner::main(command, settings, shutdown)
    })
    .await
}
