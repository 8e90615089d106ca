//! A consumer's decoding of a kombu envelope in one typed pass over its JSON: the properties a consumer reads
//! go to named slots and the headers to [`HeaderSlots`], with no map of the whole envelope built on the way
//! (a quarter of a Redis worker's CPU went to building and reading those maps). The outcome is exactly that
//! of [`Envelope::parse`] followed by `route`, `redelivered` and `into_task`, errors included: an envelope
//! this pass does not take (another shape, bad JSON) is read by `Envelope::parse` instead.

use crate::envelope::{Envelope, body_of, properties_of, redelivered_of, route_of};
use crate::error::ProtocolError;
use crate::headers::{HeaderSlots, Key};
use crate::message::TaskMessage;
use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::Value;

/// What a consumer needs from an envelope.
#[derive(Debug)]
pub struct Received {
    /// `delivery_info.exchange` ("" when absent).
    pub exchange: String,
    /// `delivery_info.routing_key` ("" when absent).
    pub routing_key: String,
    /// Restored or requeued by kombu or celeriac.
    pub redelivered: bool,
    /// The task inside, or why it cannot be decoded.
    pub message: Result<TaskMessage, ProtocolError>,
}

/// Decodes an envelope for a consumer; `Err` when it is not an envelope at all (as [`Envelope::parse`]).
pub fn receive(raw: &[u8]) -> Result<Received, ProtocolError> {
    if let Ok(w) = serde_json::from_slice::<Wire>(raw) {
        let p = &w.properties;
        let (exchange, routing_key) = route_of(p.get("delivery_info"));
        let (exchange, routing_key) = (exchange.to_string(), routing_key.to_string());
        let redelivered = redelivered_of(p.get("delivery_info"), w.headers.get("redelivered"));
        let message = body_of(&w.body, p.get("body_encoding")).and_then(|body| {
            TaskMessage::decode_slots(
                w.headers,
                properties_of(|k| p.get(k)),
                w.content_type.as_deref().unwrap_or("application/json"),
                w.content_encoding.as_deref().unwrap_or("utf-8"),
                &body,
            )
        });
        return Ok(Received {
            exchange,
            routing_key,
            redelivered,
            message,
        });
    }
    let env = Envelope::parse(raw)?;
    let (exchange, routing_key) = env.route();
    let (exchange, routing_key) = (exchange.to_string(), routing_key.to_string());
    let redelivered = env.redelivered();
    Ok(Received {
        exchange,
        routing_key,
        redelivered,
        message: env.into_task(),
    })
}

/// The envelope as [`Envelope`] reads it, with typed properties and sorted headers.
#[derive(Deserialize)]
struct Wire {
    body: Value,
    #[serde(rename = "content-encoding", default)]
    content_encoding: Option<String>,
    #[serde(rename = "content-type", default)]
    content_type: Option<String>,
    #[serde(default)]
    headers: HeaderSlots,
    #[serde(default)]
    properties: Props,
}

/// The properties a consumer reads, by [`Props::slot_of`]; the others are read and dropped.
#[derive(Default)]
struct Props([Option<Value>; 7]);

impl Props {
    fn slot_of(name: &str) -> Option<usize> {
        Some(match name {
            "correlation_id" => 0,
            "reply_to" => 1,
            "delivery_mode" => 2,
            "priority" => 3,
            "expiration" => 4,
            "body_encoding" => 5,
            "delivery_info" => 6,
            _ => return None,
        })
    }

    fn get(&self, name: &str) -> Option<&Value> {
        self.0[Self::slot_of(name)?].as_ref()
    }
}

impl<'de> Deserialize<'de> for Props {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct P;
        impl<'de> Visitor<'de> for P {
            type Value = Props;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Props, A::Error> {
                let mut p = Props::default();
                while let Some(Key(k)) = map.next_key()? {
                    // Every value is read as a JSON value, kept or not, so what fails here fails there too.
                    let v: Value = map.next_value()?;
                    if let Some(i) = Props::slot_of(&k) {
                        p.0[i] = Some(v);
                    }
                }
                Ok(p)
            }
        }
        d.deserialize_map(P)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The slow path's outcome, for comparison.
    fn by_maps(raw: &[u8]) -> Result<(String, String, bool, String), String> {
        let env = Envelope::parse(raw).map_err(|e| e.to_string())?;
        let (ex, rk) = env.route();
        let (ex, rk) = (ex.to_string(), rk.to_string());
        let r = env.redelivered();
        Ok((ex, rk, r, format!("{:?}", env.into_task())))
    }

    fn typed(raw: &[u8]) -> Result<(String, String, bool, String), String> {
        let r = receive(raw).map_err(|e| e.to_string())?;
        Ok((
            r.exchange,
            r.routing_key,
            r.redelivered,
            format!("{:?}", r.message),
        ))
    }

    #[test]
    fn same_outcome_as_the_maps_for_odd_envelopes() {
        let cases: &[&str] = &[
            r#"{"body": "W1tdLCB7fSwgbnVsbF0=", "headers": {"task": "t", "id": "i", "redelivered": true, "id": "j"}, "properties": {"body_encoding": "base64", "priority": 300, "delivery_info": {"exchange": "e", "routing_key": 5}, "priority": 7}}"#,
            r#"{"body": "[[], {}, null]", "headers": {"task": "t", "id": 1}, "properties": {"delivery_info": "x", "expiration": 5000}}"#,
            r#"{"body": 5, "headers": {"task": "t", "id": "i"}, "properties": {}}"#,
            r#"{"body": "[[], {}, null]", "headers": null, "properties": {}}"#,
            r#"{"body": "[[], {}, null]", "headers": {}, "properties": {"x": 1e999}}"#,
            r#"{"body": "[[], {}, null]", "headers": {"task": "t"}, "properties": []}"#,
            r#"{"body": "{\"task\": \"t\", \"id\": \"i\", \"args\": [1]}", "headers": {}}"#,
            r#"{"body": "[[], {}, null]", "body": "x"}"#,
            r#"{"headers": {"task": "t", "id": "i"}}"#,
            r#"["[[], {}, null]", null, null, {"task": "t", "id": "i"}, {}]"#,
            r#"{"body": "[[], {}, {\"chain\": 5}]", "headers": {"task": "t", "id": "i", "timelimit": [1, 2]}}"#,
            "not json",
            "",
        ];
        for raw in cases {
            assert_eq!(typed(raw.as_bytes()), by_maps(raw.as_bytes()), "{raw}");
        }
    }
}
