//! The trace context of the task now running, for what it publishes: the worker scopes each task's run in
//! [`scope`], and every message published inside (callbacks, chain steps, chord bodies, retries) gets its
//! `traceparent` / `tracestate` as top-level headers, where Python's `opentelemetry-instrumentation-celery`
//! reads them.

use serde_json::{Map, Value};
use std::future::Future;

/// W3C trace context headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceHeaders {
    /// `00-<trace id>-<parent span id>-<flags>`.
    pub traceparent: String,
    /// Vendor state, passed on unchanged.
    pub tracestate: Option<String>,
}

tokio::task_local! {
    static CURRENT: Option<TraceHeaders>;
}

/// Runs `f` with `headers` as the context of everything it publishes.
pub async fn scope<F: Future>(headers: Option<TraceHeaders>, f: F) -> F::Output {
    CURRENT.scope(headers, f).await
}

/// Writes the current task's trace context into a message's headers (nothing outside a traced task).
pub fn inject(headers: &mut Map<String, Value>) {
    let _ = CURRENT.try_with(|current| {
        if let Some(h) = current {
            headers.insert("traceparent".into(), Value::String(h.traceparent.clone()));
            match &h.tracestate {
                Some(s) => {
                    headers.insert("tracestate".into(), Value::String(s.clone()));
                }
                None => {
                    headers.remove("tracestate");
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn inside_a_scope_only() {
        let mut m = Map::new();
        inject(&mut m);
        assert!(m.is_empty());
        let h = TraceHeaders {
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            tracestate: Some("a=b".into()),
        };
        scope(Some(h), async {
            inject(&mut m);
        })
        .await;
        assert_eq!(
            m["traceparent"],
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        assert_eq!(m["tracestate"], "a=b");
    }
}
