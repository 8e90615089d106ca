//! Distributed traces as Python's `opentelemetry-instrumentation-celery` writes them: the W3C `traceparent`
//! (and `tracestate`) is read from a task message's top-level headers, each task runs in a CONSUMER span
//! `run/<task>` child of it with Celery's attributes, and everything the task publishes (callbacks, chain
//! steps, chord bodies, retries) carries that span's context, so one trace runs Python client → celeriac
//! → Python worker. Spans go to the global tracer provider: the binary installs an OTLP exporter when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set and says so with [`record_spans`]; without one no span is built and the
//! context passes through unchanged.

use celeriac_canvas::trace::TraceHeaders;
use celeriac_protocol::TaskMessage;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer as _,
};
use opentelemetry::{Context, KeyValue, global};
use serde_json::Value;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};

/// The remote parent named by `traceparent` (and `tracestate`), if it is valid.
pub fn parent(headers: &serde_json::Map<String, Value>) -> Option<SpanContext> {
    let tp = headers.get("traceparent").and_then(Value::as_str)?;
    let mut parts = tp.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    // Version 00 has exactly four fields; later versions may add more, never ff.
    if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) || !hex(version, 2) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    let flags = TraceFlags::new(u8::from_str_radix(flags, 16).ok()? & TraceFlags::SAMPLED.to_u8());
    let state = headers
        .get("tracestate")
        .and_then(Value::as_str)
        .and_then(|s| TraceState::from_str(s).ok())
        .unwrap_or_default();
    Some(SpanContext::new(trace_id, span_id, flags, true, state))
}

/// The headers that make a published message a child of `cx`'s span (none without a valid span).
pub fn headers(cx: &Context) -> Option<TraceHeaders> {
    let span = cx.span();
    let sc = span.span_context();
    if !sc.is_valid() {
        return None;
    }
    let state = sc.trace_state().header();
    Some(TraceHeaders {
        traceparent: format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        ),
        tracestate: (!state.is_empty()).then_some(state),
    })
}

/// Whether a tracer provider that records spans is installed ([`record_spans`]).
static RECORDING: AtomicBool = AtomicBool::new(false);

/// Says that the global tracer provider records spans: from then on each task gets its `run/<task>` span.
/// Until then (no exporter configured) a task runs in its message's trace context as received, which is what
/// the no-op provider's spans would carry anyway, without building their attributes.
pub fn record_spans() {
    RECORDING.store(true, Ordering::Relaxed);
}

/// Starts the `run/<task>` span of a received task, child of the message's trace context.
pub fn start(message: &TaskMessage, hostname: &str, queue: &str) -> Context {
    let parent = match parent(&message.headers.extra) {
        Some(sc) => Context::new().with_remote_span_context(sc),
        None => Context::new(),
    };
    if !RECORDING.load(Ordering::Relaxed) {
        return parent;
    }
    let tracer = global::tracer("celeriac");
    let mut attributes = vec![
        KeyValue::new("celery.action", "run"),
        KeyValue::new("celery.task_name", message.task().to_string()),
        KeyValue::new("messaging.message.id", message.id().to_string()),
        KeyValue::new("celery.hostname", hostname.to_string()),
        KeyValue::new("messaging.destination.name", queue.to_string()),
        KeyValue::new("celery.retries", message.headers.retries),
    ];
    let correlation = &message.properties.correlation_id;
    if !correlation.is_empty() {
        attributes.push(KeyValue::new(
            "messaging.message.conversation_id",
            correlation.clone(),
        ));
    }
    let span = tracer
        .span_builder(format!("run/{}", message.task()))
        .with_kind(SpanKind::Consumer)
        .with_attributes(attributes)
        .start_with_context(&tracer, &parent);
    parent.with_span(span)
}

/// Ends a task's span with the state Celery reports (`SUCCESS`, `FAILURE`, `RETRY`, ...).
pub fn finish(cx: &Context, state: &str) {
    let span = cx.span();
    span.set_attribute(KeyValue::new("celery.state", state.to_string()));
    if state == "FAILURE" {
        span.set_status(opentelemetry::trace::Status::error("task failed"));
    }
    span.end();
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Map, json};

    fn h(tp: &str, ts: Option<&str>) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("traceparent".into(), json!(tp));
        if let Some(ts) = ts {
            m.insert("tracestate".into(), json!(ts));
        }
        m
    }

    #[test]
    fn reads_and_writes_w3c_trace_context() {
        let sc = parent(&h(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            Some("congo=t61rcWkgMzE"),
        ))
        .unwrap();
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_sampled() && sc.is_remote());
        let cx = Context::new().with_remote_span_context(sc);
        let out = headers(&cx).unwrap();
        assert_eq!(
            out.traceparent,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        assert_eq!(out.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
        // Any valid flags; unsampled stays unsampled.
        let sc = parent(&h(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
            None,
        ))
        .unwrap();
        assert!(!sc.is_sampled());
    }

    #[test]
    fn refuses_malformed_trace_context() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-xyz92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(parent(&h(bad, None)).is_none(), "{bad:?}");
        }
        assert!(parent(&Map::new()).is_none());
    }

    #[test]
    fn without_an_exporter_the_context_passes_through() {
        let mut m = TaskMessage::new("t.x", "id-1", vec![], Map::new());
        m.headers.extra = h(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            None,
        );
        let cx = start(&m, "w@h", "q");
        let out = headers(&cx).unwrap();
        assert!(
            out.traceparent
                .starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-")
        );
        finish(&cx, "SUCCESS");
        let none = start(
            &TaskMessage::new("t.x", "id-2", vec![], Map::new()),
            "w@h",
            "q",
        );
        assert!(headers(&none).is_none());
    }
}
