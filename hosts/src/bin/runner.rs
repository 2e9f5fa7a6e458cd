//! The saga runner host: consumers, durable timers and the outbox relay; and
//! the operator commands `parked`, `resume` and `redrive` (see `runner --help`).

use clap::Parser as _;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // A bad command line exits 2 with clap's message; --help exits 0.
    let cli = hosts::runner::Cli::parse();
    let command = cli.command.unwrap_or(hosts::runner::Command::Run);
    hosts::run_host("runner", move |settings, shutdown| {
        hosts::runner::main(command, settings, shutdown)
    })
    .await
}
