//! The order-saga hosts: thin wiring from settings to the `saga` library.
//! Each binary in `src/bin/` is telemetry -> settings -> run until stopped.

pub mod api;
pub mod console;
pub mod embedded;
pub mod infra;
pub mod metrics;
pub mod operator;
pub mod ops;
pub mod runner;
pub mod scheduler;
pub mod settings;
pub mod shutdown;
pub mod telemetry;
pub mod transport;

/// Runs a host: loads settings, starts tracing, runs `body` until it ends or
/// SIGTERM/Ctrl-C, and turns the result into the exit code (a configuration
/// problem or a fatal error is logged with its cause and exits 1).
pub async fn run_host<F, Fut>(host: &str, body: F) -> std::process::ExitCode
where
    F: FnOnce(settings::Settings, tokio_util::sync::CancellationToken) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let settings = match start(host) {
        Ok(settings) => settings,
        Err(e) => {
            tracing::error!("{e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let shutdown = shutdown::on_signal();
    let code = match body(settings, shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(host, "fatal: {e:#}");
            std::process::ExitCode::FAILURE
        }
    };
    // Spans still buffered are exported before the process exits.
    telemetry::shutdown().await;
    code
}

/// Loads settings and starts logs and traces (inside the tokio runtime).
pub fn start(host: &str) -> anyhow::Result<settings::Settings> {
    let loaded = match settings::load() {
        Ok(loaded) => loaded,
        Err(e) => {
            telemetry::init("error");
            anyhow::bail!("{host}: invalid configuration: {e}");
        }
    };
    let traces = telemetry::init_host(host, &loaded.settings);
    tracing::info!(
        host,
        config_dir = %loaded.dir.display(),
        secrets = ?loaded.secrets_file,
        traces = %traces,
        "configuration loaded"
    );
    if loaded.using_example_secrets {
        tracing::warn!(
            "configuration/secrets.json not found: using secrets.example.json (LOCAL DEVELOPMENT ONLY)"
        );
    }
    Ok(loaded.settings)
}
