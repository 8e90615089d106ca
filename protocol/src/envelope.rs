//! kombu's virtual-transport envelope, the value a Redis list holds: `{"body": <base64>, "content-encoding",
//! "content-type", "headers", "properties": {correlation_id, reply_to, delivery_mode, [expiration],
//! delivery_info: {exchange, routing_key}, priority, body_encoding, delivery_tag}}` in exactly that order.

use crate::error::ProtocolError;
use crate::message::{TaskMessage, TaskProperties};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A parsed envelope. The body is still in its transport encoding (base64 for kombu).
#[derive(Debug, Clone, Deserialize)]
pub struct Envelope {
    /// The body, base64 when `properties.body_encoding == "base64"`.
    pub body: Value,
    /// `content-encoding`.
    #[serde(rename = "content-encoding", default)]
    pub content_encoding: Option<String>,
    /// `content-type`.
    #[serde(rename = "content-type", default)]
    pub content_type: Option<String>,
    /// Message headers.
    #[serde(default)]
    pub headers: Map<String, Value>,
    /// Message properties, including kombu's `delivery_info`, `delivery_tag` and `body_encoding`.
    #[serde(default)]
    pub properties: Map<String, Value>,
}

impl Envelope {
    /// Parses envelope bytes.
    pub fn parse(raw: &[u8]) -> Result<Self, ProtocolError> {
        serde_json::from_slice(raw).map_err(|source| ProtocolError::Json {
            what: "envelope",
            source,
        })
    }

    /// kombu's delivery tag (a uuid4 string), the key of the message in `unacked`.
    pub fn delivery_tag(&self) -> Option<&str> {
        self.properties.get("delivery_tag").and_then(Value::as_str)
    }

    /// `delivery_info.exchange` and `delivery_info.routing_key`.
    pub fn route(&self) -> (&str, &str) {
        route_of(self.properties.get("delivery_info"))
    }

    /// True when kombu or celeriac restored or requeued this message.
    pub fn redelivered(&self) -> bool {
        redelivered_of(
            self.properties.get("delivery_info"),
            self.headers.get("redelivered"),
        )
    }

    /// The message priority (0 when absent).
    pub fn priority(&self) -> u8 {
        priority_of(self.properties.get("priority"))
    }

    /// The body bytes, base64-decoded when the envelope says so.
    pub fn body_bytes(&self) -> Result<Vec<u8>, ProtocolError> {
        body_of(&self.body, self.properties.get("body_encoding"))
    }

    /// Decodes the task message inside.
    pub fn into_task(self) -> Result<TaskMessage, ProtocolError> {
        let body = self.body_bytes()?;
        let properties = properties_of(|k| self.properties.get(k));
        TaskMessage::decode(
            self.headers,
            properties,
            self.content_type.as_deref().unwrap_or("application/json"),
            self.content_encoding.as_deref().unwrap_or("utf-8"),
            &body,
        )
    }
}

/// `exchange` and `routing_key` of a `delivery_info` property ("" when absent or not strings).
pub(crate) fn route_of(info: Option<&Value>) -> (&str, &str) {
    let get = |k| {
        info.and_then(|i| i.get(k))
            .and_then(Value::as_str)
            .unwrap_or("")
    };
    (get("exchange"), get("routing_key"))
}

/// `delivery_info.redelivered` or the `redelivered` header, as kombu's restore sets them.
pub(crate) fn redelivered_of(info: Option<&Value>, header: Option<&Value>) -> bool {
    info.and_then(|i| i.get("redelivered"))
        .and_then(Value::as_bool)
        .unwrap_or(false)
        || header.and_then(Value::as_bool).unwrap_or(false)
}

/// A body in its transport encoding, decoded: base64 when `body_encoding` says so.
pub(crate) fn body_of(body: &Value, encoding: Option<&Value>) -> Result<Vec<u8>, ProtocolError> {
    let text = match body {
        Value::String(s) => s.as_str(),
        _ => return Err(ProtocolError::malformed("envelope", "body is not a string")),
    };
    match encoding.and_then(Value::as_str) {
        Some("base64") => Ok(STANDARD.decode(text)?),
        _ => Ok(text.as_bytes().to_vec()),
    }
}

/// The task's properties from the envelope's, read by name.
pub(crate) fn properties_of<'a>(p: impl Fn(&str) -> Option<&'a Value>) -> TaskProperties {
    let str_prop = |k| p(k).and_then(Value::as_str).map(str::to_string);
    TaskProperties {
        correlation_id: str_prop("correlation_id").unwrap_or_default(),
        reply_to: str_prop("reply_to"),
        delivery_mode: p("delivery_mode").and_then(Value::as_u64).unwrap_or(2) as u8,
        priority: priority_of(p("priority")),
        expiration: p("expiration").map(|v| {
            v.as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string())
        }),
    }
}

fn priority_of(p: Option<&Value>) -> u8 {
    p.and_then(Value::as_u64)
        .map(|n| n.min(255) as u8)
        .unwrap_or(0)
}

#[derive(Serialize)]
struct OutEnvelope<'a> {
    body: &'a str,
    #[serde(rename = "content-encoding")]
    content_encoding: &'a str,
    #[serde(rename = "content-type")]
    content_type: &'a str,
    headers: &'a crate::message::TaskHeaders,
    properties: OutProperties<'a>,
}

#[derive(Serialize)]
struct OutProperties<'a> {
    correlation_id: &'a str,
    reply_to: &'a Option<String>,
    delivery_mode: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    expiration: &'a Option<String>,
    delivery_info: DeliveryInfo<'a>,
    priority: u8,
    body_encoding: &'a str,
    delivery_tag: &'a str,
}

#[derive(Serialize)]
struct DeliveryInfo<'a> {
    exchange: &'a str,
    routing_key: &'a str,
}

/// Encodes a task message as the envelope kombu's Redis transport LPUSHes, byte for byte.
pub fn encode_task(
    msg: &TaskMessage,
    exchange: &str,
    routing_key: &str,
    delivery_tag: &str,
) -> Vec<u8> {
    let body = STANDARD.encode(msg.encode_body());
    let p = &msg.properties;
    crate::json::to_vec(&OutEnvelope {
        body: &body,
        content_encoding: "utf-8",
        content_type: "application/json",
        headers: &msg.headers,
        properties: OutProperties {
            correlation_id: &p.correlation_id,
            reply_to: &p.reply_to,
            delivery_mode: p.delivery_mode,
            expiration: &p.expiration,
            delivery_info: DeliveryInfo {
                exchange,
                routing_key,
            },
            priority: p.priority,
            body_encoding: "base64",
            delivery_tag,
        },
    })
}

/// Returns the envelope with `headers.redelivered` and `properties.delivery_info.redelivered` set, as kombu's
/// `_do_restore_message` writes it before putting a message back.
pub fn mark_redelivered(raw: &[u8]) -> Result<Vec<u8>, ProtocolError> {
    let mut v: Value = serde_json::from_slice(raw).map_err(|source| ProtocolError::Json {
        what: "envelope",
        source,
    })?;
    if let Some(h) = v.get_mut("headers").and_then(Value::as_object_mut) {
        h.insert("redelivered".into(), Value::Bool(true));
    }
    if let Some(i) = v
        .pointer_mut("/properties/delivery_info")
        .and_then(Value::as_object_mut)
    {
        i.insert("redelivered".into(), Value::Bool(true));
    }
    Ok(crate::json::to_vec(&v))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The LPUSH value of `add.delay(2, 3)` from celery 5.7.0 (spec §9, wire-redis-monitor-raw-send-plain.txt).
    const CAPTURED: &str = r#"{"body": "W1syLCAzXSwge30sIHsiY2FsbGJhY2tzIjogbnVsbCwgImVycmJhY2tzIjogbnVsbCwgImNoYWluIjogbnVsbCwgImNob3JkIjogbnVsbH1d", "content-encoding": "utf-8", "content-type": "application/json", "headers": {"lang": "py", "task": "tasks.add", "id": "dfcbf5b8-3b1a-43c6-8c67-ce6cda4b65ae", "shadow": null, "eta": null, "expires": null, "group": null, "group_index": null, "retries": 0, "timelimit": [null, null], "root_id": "dfcbf5b8-3b1a-43c6-8c67-ce6cda4b65ae", "parent_id": null, "argsrepr": "(2, 3)", "kwargsrepr": "{}", "origin": "gen18389@vm", "ignore_result": false, "replaced_task_nesting": 0, "stamped_headers": null, "stamps": {}}, "properties": {"correlation_id": "dfcbf5b8-3b1a-43c6-8c67-ce6cda4b65ae", "reply_to": "85c4ade8-5c5e-3daf-b102-4907536328d0", "delivery_mode": 2, "delivery_info": {"exchange": "", "routing_key": "celery"}, "priority": 0, "body_encoding": "base64", "delivery_tag": "1656de07-1a5d-4bd5-b3e1-d37a52198fa6"}}"#;

    #[test]
    fn decodes_captured_celery_message() {
        let env = Envelope::parse(CAPTURED.as_bytes()).unwrap();
        assert_eq!(
            env.delivery_tag(),
            Some("1656de07-1a5d-4bd5-b3e1-d37a52198fa6")
        );
        assert_eq!(env.route(), ("", "celery"));
        let m = env.into_task().unwrap();
        assert_eq!(m.task(), "tasks.add");
        assert_eq!(m.id(), "dfcbf5b8-3b1a-43c6-8c67-ce6cda4b65ae");
        assert_eq!(m.args, vec![serde_json::json!(2), serde_json::json!(3)]);
        assert_eq!(
            m.properties.reply_to.as_deref(),
            Some("85c4ade8-5c5e-3daf-b102-4907536328d0")
        );
        assert_eq!(m.headers.origin.as_deref(), Some("gen18389@vm"));
        assert_eq!(m.protocol, 2);
    }

    #[test]
    fn encodes_byte_identical_to_celery() {
        let mut m = TaskMessage::new(
            "tasks.add",
            "dfcbf5b8-3b1a-43c6-8c67-ce6cda4b65ae",
            vec![serde_json::json!(2), serde_json::json!(3)],
            Map::new(),
        );
        m.headers.origin = Some("gen18389@vm".into());
        m.properties.reply_to = Some("85c4ade8-5c5e-3daf-b102-4907536328d0".into());
        let bytes = encode_task(&m, "", "celery", "1656de07-1a5d-4bd5-b3e1-d37a52198fa6");
        assert_eq!(String::from_utf8(bytes).unwrap(), CAPTURED);
    }

    #[test]
    fn decode_then_encode_roundtrips_exactly() {
        let env = Envelope::parse(CAPTURED.as_bytes()).unwrap();
        let tag = env.delivery_tag().unwrap().to_string();
        let m = env.into_task().unwrap();
        assert_eq!(
            String::from_utf8(encode_task(&m, "", "celery", &tag)).unwrap(),
            CAPTURED
        );
    }

    #[test]
    fn redelivered_flags_as_kombu_restores() {
        let out = String::from_utf8(mark_redelivered(CAPTURED.as_bytes()).unwrap()).unwrap();
        assert!(
            out.contains(r#""stamps": {}, "redelivered": true}"#),
            "{out}"
        );
        assert!(out.contains(
            r#""delivery_info": {"exchange": "", "routing_key": "celery", "redelivered": true}"#
        ));
        assert!(Envelope::parse(out.as_bytes()).unwrap().redelivered());
    }
}
