//! The client side of Celery's remote control (`app.control.broadcast`): builds the request kombu's
//! `Mailbox` sends, broadcasts it through [`Broker::control_call`] and collects the replies that carry its
//! ticket, as `{node: reply}`. Used by `celeriac inspect/control` and `celeriac flower`.

use crate::Result;
use crate::prelude::*;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use celeriac_protocol::envelope::Envelope;
use serde_json::{Map, Value, json};
use std::time::Duration;

/// Broadcasts `method` with `arguments` to `destination` (every worker when `None`) and returns the replies
/// received within `timeout`, keyed by node name; with a destination it stops once each node answered.
pub async fn call(
    broker: &dyn Broker,
    method: &str,
    arguments: Value,
    destination: Option<&[String]>,
    timeout: Duration,
) -> Result<Map<String, Value>> {
    let oid = uuid::Uuid::new_v4().to_string();
    let ticket = uuid::Uuid::new_v4().to_string();
    let mut body = Map::new();
    body.insert("method".into(), json!(method));
    body.insert("arguments".into(), arguments);
    body.insert("destination".into(), json!(destination));
    body.insert("pattern".into(), Value::Null);
    body.insert("matcher".into(), Value::Null);
    body.insert("ticket".into(), json!(ticket));
    body.insert(
        "reply_to".into(),
        json!({"exchange": "reply.celery.pidbox", "routing_key": oid}),
    );
    let now = chrono::Utc::now().timestamp_micros() as f64 / 1e6;
    let envelope = json!({
        "body": STANDARD.encode(celeriac_protocol::json::to_vec(&body)),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"clock": 1, "expires": now + timeout.as_secs_f64()},
        "properties": {"delivery_mode": 2, "delivery_info": {"exchange": "celery.pidbox", "routing_key": ""},
            "priority": 0, "body_encoding": "base64", "delivery_tag": uuid::Uuid::new_v4().to_string()},
    });
    let raw = broker
        .control_call(
            &celeriac_protocol::json::to_vec(&envelope),
            &oid,
            timeout.max(Duration::from_millis(50)),
            destination.map(<[String]>::len),
        )
        .await?;
    let mut replies = Map::new();
    for r in raw {
        let Ok(env) = Envelope::parse(&r) else {
            continue;
        };
        if env.headers.get("ticket").and_then(Value::as_str) != Some(ticket.as_str()) {
            continue;
        }
        let Ok(bytes) = env.body_bytes() else {
            continue;
        };
        if let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(&bytes) {
            replies.extend(m);
        }
    }
    Ok(replies)
}
