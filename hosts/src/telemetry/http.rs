//! HTTP and traces: the server span of every API request (continuing an
//! incoming `traceparent`), and the client the OTLP exporter posts with.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use poem::{Endpoint, IntoResponse};
use saga::trace::{self, TRACEPARENT, TRACESTATE, TraceContext};
use tracing::Instrument as _;

/// Poem middleware (`.around(trace_request)`): runs the request in an
/// `http.request` span named `METHOD /path`, a child of the caller's
/// `traceparent` when it sent a valid one, and logs the response status.
/// Handlers record `order_id` (and the message and correlation ids) in it.
pub async fn trace_request<E: Endpoint>(
    next: E,
    req: poem::Request,
) -> poem::Result<poem::Response> {
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    let parent = header(TRACEPARENT).and_then(|p| TraceContext::parse(p, header(TRACESTATE)));
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let span = tracing::info_span!(
        "http.request",
        otel.name = %format!("{method} {path}"),
        otel.kind = "server",
        http.request.method = %method,
        url.path = %path,
        http.response.status_code = tracing::field::Empty,
        order_id = tracing::field::Empty,
        message_id = tracing::field::Empty,
        correlation_id = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    trace::continue_trace(&span, parent.as_ref());
    let started = Instant::now();
    async move {
        let response = next.call(req).await.map(IntoResponse::into_response);
        let status = match &response {
            Ok(r) => r.status(),
            Err(e) => e.status(),
        };
        let span = tracing::Span::current();
        span.record("http.response.status_code", status.as_u16());
        let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
        if status.is_server_error() {
            tracing::error!(status = status.as_u16(), elapsed_ms, "response");
        } else {
            tracing::info!(status = status.as_u16(), elapsed_ms, "response");
        }
        response
    }
    .instrument(span)
    .await
}

/// The OTLP exporter's HTTP client: reqwest on the host's tokio runtime.
/// The exporter calls it from its own thread (outside the runtime), so each
/// request is spawned onto the runtime it was created in.
#[derive(Debug)]
pub struct ExportClient {
    http: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

impl ExportClient {
    /// Must be called inside the tokio runtime.
    pub fn new(timeout: Duration) -> anyhow::Result<Self> {
        Ok(Self {
            http: reqwest::Client::builder().timeout(timeout).build()?,
            runtime: tokio::runtime::Handle::try_current()?,
        })
    }
}

#[async_trait]
impl HttpClient for ExportClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let request = reqwest::Request::try_from(request)?;
        let http = self.http.clone();
        let (status, headers, body) = self
            .runtime
            .spawn(async move {
                let response = http.execute(request).await?;
                let status = response.status();
                let headers = response.headers().clone();
                let body = response.bytes().await?;
                Ok::<_, reqwest::Error>((status, headers, body))
            })
            .await??;
        let mut response = Response::builder().status(status).body(body)?;
        *response.headers_mut() = headers;
        Ok(response)
    }
}
