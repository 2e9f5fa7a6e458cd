//! W3C trace context (`traceparent`, `tracestate`) across the saga's
//! asynchronous hops.
//!
//! A saga instance's work is spread over time and processes: the request
//! that starts it, the relay that publishes its events, the consumers, the
//! timers that fire for it, the sweep that times it out (for an order: the
//! HTTP request, the payment timer, the expiry). To make that one
//! trace, the context of the span that *writes* something for later is
//! stored with it (outbox rows, timer rows, the saga instance), travels in
//! the message headers, and the span that picks it up continues it.
//!
//! Spans are `tracing` spans; the bridge to OpenTelemetry is
//! `tracing-opentelemetry`. The hosts install its layer (and decide whether
//! anything is exported). Without the layer, [`TraceContext::current`] is
//! `None` and a context read from a row or a header is passed on unchanged
//! where the code does so explicitly (the relay), so propagation does not
//! depend on exporting.

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The message header (and HTTP header) carrying the trace parent.
pub const TRACEPARENT: &str = "traceparent";
/// The message header (and HTTP header) carrying vendor trace state.
pub const TRACESTATE: &str = "tracestate";

/// Longest `tracestate` kept (the W3C limit is 32 members; 512 bytes is the
/// size every participant must be able to propagate).
const MAX_TRACESTATE: usize = 512;

/// A validated W3C trace context: `traceparent` plus optional `tracestate`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceContext {
    traceparent: String,
    tracestate: Option<String>,
}

impl TraceContext {
    /// Reads a `traceparent` (and `tracestate`) as received in a header or
    /// stored in a row. `None` when the `traceparent` is not a valid W3C
    /// trace parent (the receiver then starts a new trace, as the spec asks);
    /// an invalid `tracestate` alone is dropped.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<Self> {
        let traceparent = parse_traceparent(traceparent.trim())?;
        let tracestate = tracestate
            .map(str::trim)
            .filter(|s| !s.is_empty() && s.len() <= MAX_TRACESTATE)
            .filter(|s| s.parse::<TraceState>().is_ok())
            .map(str::to_owned);
        Some(Self {
            traceparent,
            tracestate,
        })
    }

    /// Reads the two nullable columns of a row (see [`Self::columns`]).
    pub fn from_columns(traceparent: Option<&str>, tracestate: Option<&str>) -> Option<Self> {
        traceparent.and_then(|p| Self::parse(p, tracestate))
    }

    /// The two nullable columns (`traceparent`, `tracestate`) for a row.
    pub fn columns(context: Option<&Self>) -> (Option<String>, Option<String>) {
        match context {
            Some(c) => (Some(c.traceparent.clone()), c.tracestate.clone()),
            None => (None, None),
        }
    }

    /// The `traceparent` header value (`00-<trace id>-<span id>-<flags>`).
    pub fn traceparent(&self) -> &str {
        &self.traceparent
    }

    /// The `tracestate` header value, if any.
    pub fn tracestate(&self) -> Option<&str> {
        self.tracestate.as_deref()
    }

    /// The trace id: 32 lowercase hex digits.
    pub fn trace_id(&self) -> &str {
        &self.traceparent[3..35]
    }

    /// The parent span id: 16 lowercase hex digits.
    pub fn span_id(&self) -> &str {
        &self.traceparent[36..52]
    }

    /// The context of the current span, when an OpenTelemetry layer is
    /// installed and the span is valid.
    pub fn current() -> Option<Self> {
        Self::of(&Span::current())
    }

    /// The context of `span` (this span as the parent of what comes next).
    pub fn of(span: &Span) -> Option<Self> {
        let context = span.context();
        let otel = context.span();
        let sc = otel.span_context();
        if !sc.is_valid() {
            return None;
        }
        let traceparent = format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        );
        let state = sc.trace_state().header();
        Some(Self {
            traceparent,
            tracestate: (!state.is_empty()).then_some(state),
        })
    }

    fn span_context(&self) -> Option<SpanContext> {
        let trace_id = TraceId::from_hex(self.trace_id()).ok()?;
        let span_id = SpanId::from_hex(self.span_id()).ok()?;
        let flags = u8::from_str_radix(&self.traceparent[53..55], 16).ok()?;
        let state = self
            .tracestate
            .as_deref()
            .and_then(|s| s.parse::<TraceState>().ok())
            .unwrap_or_default();
        Some(SpanContext::new(
            trace_id,
            span_id,
            // Only the sampled bit is defined; other bits are not passed on.
            TraceFlags::new(flags & TraceFlags::SAMPLED.to_u8()),
            true,
            state,
        ))
    }
}

/// Makes `span` continue `parent`'s trace (as a child of the remote span it
/// names), and records the span's trace id in its `trace_id` field if it
/// has one, so log lines can be matched to the trace. Call it right after
/// creating the span, before it is entered. With `None`, the span keeps its
/// own parent (the current span, or a new trace).
pub fn continue_trace(span: &Span, parent: Option<&TraceContext>) {
    if let Some(sc) = parent.and_then(TraceContext::span_context) {
        let context = opentelemetry::Context::new().with_remote_span_context(sc);
        if let Err(e) = span.set_parent(context) {
            tracing::debug!(error = %e, "cannot set a span's trace parent");
        }
    }
    let trace_id = TraceContext::of(span)
        .map(|c| c.trace_id().to_owned())
        .or_else(|| parent.map(|p| p.trace_id().to_owned()));
    if let Some(trace_id) = trace_id {
        span.record("trace_id", trace_id.as_str());
    }
}

/// Validates a `traceparent`; returns its version-00 form.
fn parse_traceparent(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    if bytes.len() < 55 {
        return None;
    }
    let version = &value[0..2];
    if !is_lower_hex(version) || version == "ff" {
        return None;
    }
    // Version 00 is exactly 55 characters; a later version may append
    // fields after another dash, which a version-00 reader ignores.
    if version == "00" && bytes.len() != 55 {
        return None;
    }
    if bytes.len() > 55 && bytes[55] != b'-' {
        return None;
    }
    if bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
        return None;
    }
    let trace_id = &value[3..35];
    let span_id = &value[36..52];
    let flags = &value[53..55];
    let all_zero = |s: &str| s.bytes().all(|b| b == b'0');
    if !is_lower_hex(trace_id) || all_zero(trace_id) {
        return None;
    }
    if !is_lower_hex(span_id) || all_zero(span_id) {
        return None;
    }
    if !is_lower_hex(flags) {
        return None;
    }
    Some(format!("00-{trace_id}-{span_id}-{flags}"))
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_is_read_with_its_ids() {
        let c = TraceContext::parse(VALID, Some("congo=t61rcWkgMzE")).expect("valid");
        assert_eq!(c.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(c.span_id(), "00f067aa0ba902b7");
        assert_eq!(c.traceparent(), VALID);
        assert_eq!(c.tracestate(), Some("congo=t61rcWkgMzE"));
        let sc = c.span_context().expect("span context");
        assert!(sc.is_valid() && sc.is_remote() && sc.is_sampled());
    }

    #[test]
    fn invalid_traceparents_are_refused() {
        for bad in [
            "",
            "garbage",
            // all-zero trace id / span id
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // upper case, version ff, wrong separators, too long for 00
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
        ] {
            assert_eq!(TraceContext::parse(bad, None), None, "{bad:?}");
        }
    }

    #[test]
    fn a_later_version_is_read_as_version_00() {
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra";
        let c = TraceContext::parse(later, None).expect("forward compatible");
        assert_eq!(c.traceparent(), VALID);
    }

    #[test]
    fn an_invalid_tracestate_is_dropped_alone() {
        let c = TraceContext::parse(VALID, Some("not a = valid state")).expect("valid parent");
        assert_eq!(c.tracestate(), None);
        let (parent, state) = TraceContext::columns(Some(&c));
        assert_eq!(
            TraceContext::from_columns(parent.as_deref(), state.as_deref()),
            Some(c)
        );
    }

    #[test]
    fn without_an_opentelemetry_layer_there_is_no_current_context() {
        let span = tracing::info_span!("test", trace_id = tracing::field::Empty);
        assert_eq!(TraceContext::of(&span), None);
        // Continuing a trace without a layer is harmless.
        continue_trace(&span, TraceContext::parse(VALID, None).as_ref());
    }
}
