//! Celery events: the body (`{"hostname", "utcoffset", "pid", "clock", <fields>, "timestamp", "type"}`), the
//! routing key (`task-succeeded` → `task.succeeded`) and kombu's fanout envelope for the `celeryev` exchange.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Map, Value, json};

/// The routing key of an event type.
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
pub fn body(h: &EventHeader<'_>, kind: &str, fields: &Map<String, Value>) -> Value {
    let mut m = Map::new();
    m.insert("hostname".into(), h.hostname.into());
    m.insert("utcoffset".into(), json!(h.utcoffset));
    m.insert("pid".into(), h.pid.into());
    m.insert("clock".into(), h.clock.into());
    for (k, v) in fields {
        m.insert(k.clone(), v.clone());
    }
    m.insert("timestamp".into(), json!(h.timestamp));
    m.insert("type".into(), kind.into());
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
        let b = body(&h, "task-started", &f);
        assert_eq!(
            crate::json::to_string(&b),
            r#"{"hostname": "w1@vm", "utcoffset": 0.0, "pid": 24785, "clock": 25, "uuid": "fc5ef3d7-36f4-4d5c-8b4d-e8ea13c72231", "timestamp": 1795234635.9290714, "type": "task-started"}"#
        );
        let env =
            String::from_utf8(envelope(&b, "w1@vm", &routing_key("task-started"), "t")).unwrap();
        assert!(env.ends_with(r#""headers": {"hostname": "w1@vm"}, "properties": {"delivery_mode": 1, "delivery_info": {"exchange": "celeryev", "routing_key": "task.started"}, "priority": 0, "body_encoding": "base64", "delivery_tag": "t"}}"#), "{env}");
    }
}
