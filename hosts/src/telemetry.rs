//! Tracing set-up shared by every host: `RUST_LOG` wins, else `logging.filter`.

use tracing_subscriber::EnvFilter;

pub fn init(default_filter: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(default_filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // A second init (tests) is not an error worth failing over.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true)
        // Logs go to stderr, so a command's own output (e.g. `runner parked`)
        // is alone on stdout.
        .with_writer(std::io::stderr)
        .try_init();
}
