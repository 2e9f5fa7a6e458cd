//! The embedded default (`cargo run --release`): API, runner and scheduler in
//! one process, on a SQLite file under `data/` and an in-process transport.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    hosts::run_host("embedded", hosts::embedded::run).await
}
