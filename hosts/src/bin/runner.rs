//! The saga runner host: consumers, durable timers and the outbox relay; and
//! the operator commands `parked`, `resume` and `redrive` (see `runner --help`).

use clap::Parser as _;

// One thread runs the consumers, timer loops and relay (lapin keeps its own
// I/O thread; blocking work goes to tokio's blocking pool). The runner's
// work is waiting on the database and the broker: on the two-core bench
// machine the multi-threaded runtime spent its extra thread on wake-ups
// between threads (futex calls were a quarter of the runner's CPU time),
// and end to end went from 1,054-1,242 to 1,156-1,344 orders/s in
// alternating runs. More throughput comes from more runners (competing
// consumers), not more threads in one.
#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    // A bad command line exits 2 with clap's message; --help exits 0.
    let cli = hosts::runner::Cli::parse();
    let command = cli.command.unwrap_or(hosts::runner::Command::Run);
    hosts::run_host("runner", move |settings, shutdown| {
        hosts::runner::main(command, settings, shutdown)
    })
    .await
}
