//! Logs and traces, shared by every host.
//!
//! - **Logs** go to stderr, filtered by `RUST_LOG` (else `logging.filter`),
//!   as text or JSON (`logging.format`: `text`, `json`, or `auto` = text on a
//!   terminal, JSON otherwise). A JSON line carries the event's fields plus
//!   those of its spans (`span`, `spans`): order id, message id, correlation
//!   id, message type and trace id in a handler's span.
//! - **Traces**: every host bridges its `tracing` spans to OpenTelemetry, so
//!   span contexts exist and the W3C `traceparent` is propagated (HTTP in,
//!   outbox rows, message headers, timers, saga instances; see `saga::trace`).
//!   Spans are exported over OTLP/HTTP (JSON) only when an endpoint is
//!   configured (`tracing.otlp_endpoint`, else `OTEL_EXPORTER_OTLP_ENDPOINT`
//!   or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`); [`shutdown`] flushes them.

use std::io::IsTerminal as _;
use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::{DynFilterFn, LevelFilter};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer};

use crate::settings::{LogFormat, Settings};

pub mod http;

/// The tracer provider of this process, kept for the flush at shutdown.
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// How long one export request may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Text logs only, no traces: for commands that fail before settings are
/// read, and for the healthcheck probe. `RUST_LOG` wins over `default_filter`.
pub fn init(default_filter: &str) {
    // A second init (tests) is not an error worth failing over.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(env_filter(default_filter))
        .with_target(true)
        // Logs go to stderr, so a command's own output (e.g. `runner parked`)
        // is alone on stdout.
        .with_writer(std::io::stderr)
        .try_init();
}

/// Logs in the configured format and the OpenTelemetry bridge, for `host`.
/// Must run inside the tokio runtime (the exporter's HTTP client uses it).
/// Returns a description of where spans go, for the start-up log line.
pub fn init_host(host: &str, settings: &Settings) -> String {
    let json = match settings.logging.format {
        LogFormat::Text => false,
        LogFormat::Json => true,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let logs = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(true)
            .with_target(true)
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_target(true)
            .with_writer(std::io::stderr)
            .boxed()
    };

    let service = if settings.tracing.service_name.trim().is_empty() {
        host.to_owned()
    } else {
        settings.tracing.service_name.trim().to_owned()
    };
    let (provider, export) = match tracer_provider(&service, &settings.tracing.otlp_endpoint) {
        Ok(built) => built,
        Err(e) => {
            // A broken exporter must not stop the host: trace without export.
            let provider = SdkTracerProvider::builder()
                .with_resource(Resource::builder().with_service_name(service).build())
                .build();
            (provider, format!("not exported ({e})"))
        }
    };
    let traces = tracing_opentelemetry::layer().with_tracer(provider.tracer("order-saga"));
    if tracing_subscriber::registry()
        .with(global_filter(env_filter(&settings.logging.filter)))
        .with(logs)
        .with(traces)
        .try_init()
        .is_ok()
    {
        let _ = PROVIDER.set(provider);
    }
    export
}

/// Exports the spans still buffered and stops the exporter (waits at most
/// a few seconds). Call once, at the end of a host's run.
pub async fn shutdown() {
    let Some(provider) = PROVIDER.get().cloned() else {
        return;
    };
    // Blocking: the batch processor's thread finishes the export, whose HTTP
    // request runs on this runtime; so wait on a blocking thread.
    let result = tokio::task::spawn_blocking(move || provider.shutdown()).await;
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "traces could not be flushed at shutdown"),
        Err(e) => tracing::warn!(error = %e, "traces could not be flushed at shutdown"),
    }
}

/// One filter for the whole stack: what the log filter enables, plus this
/// project's spans at INFO whatever the log filter says (a span alone prints
/// nothing; it carries the trace context, so quieter logs cannot break
/// propagation).
///
/// Deliberately global, not per-layer: per-layer filters lose the next event
/// after sqlx asks `log_enabled!` (tracing-subscriber issues #2519, #2704),
/// which silently dropped lines such as "runner started".
fn global_filter<S>(env: EnvFilter) -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let hint = env
        .max_level_hint()
        .map_or(LevelFilter::TRACE, |h| h.max(LevelFilter::INFO));
    DynFilterFn::new(move |meta, cx| {
        let ours = meta.target().starts_with("saga") || meta.target().starts_with("hosts");
        (meta.is_span() && ours && *meta.level() <= tracing::Level::INFO)
            || env.enabled(meta, cx.clone())
    })
    .with_max_level_hint(hint)
}

fn env_filter(default_filter: &str) -> EnvFilter {
    EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(default_filter))
        .unwrap_or_else(|_| EnvFilter::new("info"))
}

/// The provider, with an OTLP/HTTP-JSON batch exporter when an endpoint is
/// configured; and a description of where spans go.
fn tracer_provider(service: &str, endpoint: &str) -> anyhow::Result<(SdkTracerProvider, String)> {
    let resource = Resource::builder()
        .with_service_name(service.to_owned())
        .build();
    let builder = SdkTracerProvider::builder().with_resource(resource);
    let from_env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let endpoint = endpoint.trim();
    let (url, described) = if !endpoint.is_empty() {
        let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
        (Some(url.clone()), url)
    } else if let Some(url) = from_env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .or_else(|| from_env("OTEL_EXPORTER_OTLP_ENDPOINT"))
    {
        // The exporter reads the variables itself (and adds `/v1/traces` to
        // the general one).
        (None, format!("{url} (from the environment)"))
    } else {
        return Ok((
            builder.build(),
            "not exported (no OTLP endpoint)".to_owned(),
        ));
    };
    let client = http::ExportClient::new(EXPORT_TIMEOUT)?;
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpJson)
        .with_timeout(EXPORT_TIMEOUT)
        .with_http_client(client);
    if let Some(url) = url {
        exporter = exporter.with_endpoint(url);
    }
    let exporter = exporter.build()?;
    Ok((
        builder.with_batch_exporter(exporter).build(),
        format!("exported as OTLP/HTTP JSON to {described}"),
    ))
}
