//! Celery events: their closed set of types ([`EventKind`]), the body (`{"hostname", "utcoffset", "pid",
//! "clock", <fields>, "timestamp", "type"}`), the routing key (`task-succeeded` → `task.succeeded`) and
//! kombu's fanout envelope for the `celeryev` exchange.

use crate::result::State;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Map, Value, json};

/// The event types Celery's workers and clients send (`celery.events`), once for every crate: the worker
/// sends them, the canvas client sends `task-sent`, flower-compat reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    /// A client published a task (`task_send_sent_event`).
    TaskSent,
    /// A worker received a task.
    TaskReceived,
    /// A worker started running a task.
    TaskStarted,
    /// A task returned.
    TaskSucceeded,
    /// A task raised (or was refused before running).
    TaskFailed,
    /// A task was rejected (`Reject`, or an unregistered task with `requeue=False`).
    TaskRejected,
    /// A task was revoked (by id or stamp, expired, or terminated).
    TaskRevoked,
    /// A task asked to be retried.
    TaskRetried,
    /// A worker came up.
    WorkerOnline,
    /// A worker is alive (every `freq` seconds).
    WorkerHeartbeat,
    /// A worker is going down.
    WorkerOffline,
}

impl EventKind {
    /// Every kind, in Celery's order.
    pub const ALL: [EventKind; 11] = [
        EventKind::TaskSent,
        EventKind::TaskReceived,
        EventKind::TaskStarted,
        EventKind::TaskSucceeded,
        EventKind::TaskFailed,
        EventKind::TaskRejected,
        EventKind::TaskRevoked,
        EventKind::TaskRetried,
        EventKind::WorkerOnline,
        EventKind::WorkerHeartbeat,
        EventKind::WorkerOffline,
    ];

    /// The `type` field (`task-succeeded`).
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::TaskSent => "task-sent",
            EventKind::TaskReceived => "task-received",
            EventKind::TaskStarted => "task-started",
            EventKind::TaskSucceeded => "task-succeeded",
            EventKind::TaskFailed => "task-failed",
            EventKind::TaskRejected => "task-rejected",
            EventKind::TaskRevoked => "task-revoked",
            EventKind::TaskRetried => "task-retried",
            EventKind::WorkerOnline => "worker-online",
            EventKind::WorkerHeartbeat => "worker-heartbeat",
            EventKind::WorkerOffline => "worker-offline",
        }
    }

    /// The routing key on the `celeryev` exchange (`task.succeeded`).
    pub fn routing_key(self) -> &'static str {
        match self {
            EventKind::TaskSent => "task.sent",
            EventKind::TaskReceived => "task.received",
            EventKind::TaskStarted => "task.started",
            EventKind::TaskSucceeded => "task.succeeded",
            EventKind::TaskFailed => "task.failed",
            EventKind::TaskRejected => "task.rejected",
            EventKind::TaskRevoked => "task.revoked",
            EventKind::TaskRetried => "task.retried",
            EventKind::WorkerOnline => "worker.online",
            EventKind::WorkerHeartbeat => "worker.heartbeat",
            EventKind::WorkerOffline => "worker.offline",
        }
    }

    /// The kind of a `type` field; `None` for a type outside Celery's set (a custom event).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The state a task event moves its task to, as Celery's event state sets it (`task-sent` → PENDING,
    /// `task-retried` → RETRY); `None` for worker events.
    pub fn task_state(self) -> Option<State> {
        Some(match self {
            EventKind::TaskSent => State::Pending,
            EventKind::TaskReceived => State::Received,
            EventKind::TaskStarted => State::Started,
            EventKind::TaskSucceeded => State::Success,
            EventKind::TaskFailed => State::Failure,
            EventKind::TaskRejected => State::Rejected,
            EventKind::TaskRevoked => State::Revoked,
            EventKind::TaskRetried => State::Retry,
            EventKind::WorkerOnline | EventKind::WorkerHeartbeat | EventKind::WorkerOffline => {
                return None;
            }
        })
    }

    /// Whether it is about a task (`task-*`), not a worker.
    pub fn is_task(self) -> bool {
        !self.is_worker()
    }

    /// Whether it is about a worker (`worker-*`).
    pub fn is_worker(self) -> bool {
        matches!(
            self,
            EventKind::WorkerOnline | EventKind::WorkerHeartbeat | EventKind::WorkerOffline
        )
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The routing key of an event type, known or custom (`-` becomes `.`).
pub fn routing_key(kind: &str) -> String {
    kind.replace('-', ".")
}

/// The common fields around an event's own, in Celery's order.
#[derive(Debug, Clone)]
pub struct EventHeader<'a> {
    /// Node name.
    pub hostname: &'a str,
    /// Hours west of UTC.
    pub utcoffset: f64,
    /// Process id.
    pub pid: u32,
    /// Lamport clock.
    pub clock: u64,
    /// Unix seconds.
    pub timestamp: f64,
}

/// The event body object.
pub fn body(h: &EventHeader<'_>, kind: EventKind, fields: &Map<String, Value>) -> Value {
    let mut m = Map::new();
    m.insert("hostname".into(), h.hostname.into());
    m.insert("utcoffset".into(), json!(h.utcoffset));
    m.insert("pid".into(), h.pid.into());
    m.insert("clock".into(), h.clock.into());
    for (k, v) in fields {
        m.insert(k.clone(), v.clone());
    }
    m.insert("timestamp".into(), json!(h.timestamp));
    m.insert("type".into(), kind.as_str().into());
    Value::Object(m)
}

/// kombu's envelope of an event published to the `celeryev` exchange (delivery mode 1, base64 body).
pub fn envelope(body: &Value, hostname: &str, routing_key: &str, delivery_tag: &str) -> Vec<u8> {
    let v = json!({
        "body": STANDARD.encode(crate::json::to_vec(body)),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"hostname": hostname},
        "properties": {
            "delivery_mode": 1,
            "delivery_info": {"exchange": "celeryev", "routing_key": routing_key},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": delivery_tag,
        },
    });
    crate::json::to_vec(&v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_captured_task_started() {
        let h = EventHeader {
            hostname: "w1@vm",
            utcoffset: 0.0,
            pid: 24785,
            clock: 25,
            timestamp: 1795234635.9290714,
        };
        let mut f = Map::new();
        f.insert("uuid".into(), "fc5ef3d7-36f4-4d5c-8b4d-e8ea13c72231".into());
        let b = body(&h, EventKind::TaskStarted, &f);
        assert_eq!(
            crate::json::to_string(&b),
            r#"{"hostname": "w1@vm", "utcoffset": 0.0, "pid": 24785, "clock": 25, "uuid": "fc5ef3d7-36f4-4d5c-8b4d-e8ea13c72231", "timestamp": 1795234635.9290714, "type": "task-started"}"#
        );
        let env = String::from_utf8(envelope(
            &b,
            "w1@vm",
            EventKind::TaskStarted.routing_key(),
            "t",
        ))
        .unwrap();
        assert!(env.ends_with(r#""headers": {"hostname": "w1@vm"}, "properties": {"delivery_mode": 1, "delivery_info": {"exchange": "celeryev", "routing_key": "task.started"}, "priority": 0, "body_encoding": "base64", "delivery_tag": "t"}}"#), "{env}");
    }

    #[test]
    fn event_kinds_round_trip_and_route_as_celery() {
        for k in EventKind::ALL {
            assert_eq!(EventKind::parse(k.as_str()), Some(k));
            assert_eq!(k.routing_key(), routing_key(k.as_str()));
            assert_eq!(k.is_task(), k.as_str().starts_with("task-"));
        }
        assert_eq!(EventKind::parse("task-custom"), None);
        assert_eq!(EventKind::TaskRetried.task_state(), Some(State::Retry));
        assert_eq!(EventKind::WorkerOnline.task_state(), None);
        assert_eq!(EventKind::TaskSucceeded.routing_key(), "task.succeeded");
        assert_eq!(EventKind::WorkerOffline.to_string(), "worker-offline");
    }
}
