//! AMQP field tables ↔ JSON, and task messages ↔ AMQP messages, as py-amqp encodes them: `str`→`S`,
//! `bool`→`t`, `int`→`I` (or `l` beyond 32 bits, `T` beyond 63), `float`→`d`, `None`→`V`, `list`→`A`, `dict`→`F`
//! (spec §3.2). The body travels raw (no base64, no envelope); task headers go in the header table.

use celeriac_protocol::{ProtocolError, TaskMessage, TaskProperties};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use serde_json::{Map, Number, Value};

/// JSON → AMQP value, with py-amqp's type choices.
pub fn to_amqp(v: &Value) -> AMQPValue {
    match v {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                match i32::try_from(i) {
                    Ok(small) => AMQPValue::LongInt(small),
                    Err(_) => AMQPValue::LongLongInt(i),
                }
            } else if let Some(u) = n.as_u64() {
                // Beyond i64: AMQP's only unsigned 64-bit type keeps the value exact.
                AMQPValue::Timestamp(u)
            } else {
                AMQPValue::Double(n.as_f64().unwrap_or(0.0))
            }
        }
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_bytes())),
        Value::Array(items) => AMQPValue::FieldArray(FieldArray::from(
            items.iter().map(to_amqp).collect::<Vec<_>>(),
        )),
        Value::Object(m) => AMQPValue::FieldTable(to_table(m)),
    }
}

/// JSON object → field table.
pub fn to_table(m: &Map<String, Value>) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in m {
        t.insert(ShortString::from(k.as_str()), to_amqp(v));
    }
    t
}

/// AMQP value → JSON (integers of every width, floats, strings as UTF-8 with lossy fallback).
pub fn from_amqp(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(i) => Value::from(*i),
        AMQPValue::ShortShortUInt(i) => Value::from(*i),
        AMQPValue::ShortInt(i) => Value::from(*i),
        AMQPValue::ShortUInt(i) => Value::from(*i),
        AMQPValue::LongInt(i) => Value::from(*i),
        AMQPValue::LongUInt(i) => Value::from(*i),
        AMQPValue::LongLongInt(i) => Value::from(*i),
        AMQPValue::Float(f) => Number::from_f64(f64::from(*f)).map_or(Value::Null, Value::Number),
        AMQPValue::Double(f) => Number::from_f64(*f).map_or(Value::Null, Value::Number),
        AMQPValue::DecimalValue(d) => {
            let f = f64::from(d.value) / 10f64.powi(i32::from(d.scale));
            Number::from_f64(f).map_or(Value::Null, Value::Number)
        }
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_string()),
        AMQPValue::LongString(s) => {
            Value::String(String::from_utf8_lossy(s.as_bytes()).into_owned())
        }
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(from_amqp).collect()),
        AMQPValue::Timestamp(t) => Value::from(*t),
        AMQPValue::FieldTable(t) => Value::Object(from_table(t)),
        AMQPValue::ByteArray(b) => {
            Value::String(String::from_utf8_lossy(b.as_slice()).into_owned())
        }
        AMQPValue::Void => Value::Null,
    }
}

/// Field table → JSON object.
pub fn from_table(t: &FieldTable) -> Map<String, Value> {
    t.inner()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), from_amqp(v)))
        .collect()
}

/// The body and properties Celery's AMQP publisher sends for a task (spec §3.2): raw JSON body, headers in
/// the table, `content_type`, `content_encoding`, `delivery_mode`, `priority`, `correlation_id`,
/// `reply_to` and `expiration`.
pub fn encode_task(msg: &TaskMessage) -> (Vec<u8>, BasicProperties) {
    let headers = match msg.headers.to_value() {
        Value::Object(m) => to_table(&m),
        _ => FieldTable::default(),
    };
    let p = &msg.properties;
    let mut props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_headers(headers)
        .with_delivery_mode(p.delivery_mode)
        .with_priority(p.priority)
        .with_correlation_id(p.correlation_id.as_str().into());
    if let Some(r) = &p.reply_to {
        props = props.with_reply_to(r.as_str().into());
    }
    if let Some(e) = &p.expiration {
        props = props.with_expiration(e.as_str().into());
    }
    (msg.encode_body(), props)
}

/// Decodes a delivered task (protocol 1 or 2) from its properties and body.
pub fn decode_task(props: &BasicProperties, body: &[u8]) -> Result<TaskMessage, ProtocolError> {
    let headers = props.headers().as_ref().map(from_table).unwrap_or_default();
    let properties = TaskProperties {
        correlation_id: props
            .correlation_id()
            .as_ref()
            .map(|s| s.as_str().to_string())
            .unwrap_or_default(),
        reply_to: props.reply_to().as_ref().map(|s| s.as_str().to_string()),
        delivery_mode: props.delivery_mode().unwrap_or(2),
        priority: props.priority().unwrap_or(0),
        expiration: props.expiration().as_ref().map(|s| s.as_str().to_string()),
    };
    TaskMessage::decode(
        headers,
        properties,
        props
            .content_type()
            .as_ref()
            .map_or("application/json", |s| s.as_str()),
        props
            .content_encoding()
            .as_ref()
            .map_or("utf-8", |s| s.as_str()),
        body,
    )
}

/// A kombu virtual-transport envelope (what the Redis transport carries and the worker's pidbox and event
/// code reads) built from an AMQP message, so remote control works the same on both transports.
pub fn to_envelope(
    props: &BasicProperties,
    body: &[u8],
    exchange: &str,
    routing_key: &str,
) -> Vec<u8> {
    use base64::Engine;
    let headers = props.headers().as_ref().map(from_table).unwrap_or_default();
    let s = |o: &Option<ShortString>| o.as_ref().map(|s| Value::String(s.as_str().to_string()));
    let mut properties = Map::new();
    if let Some(c) = s(props.correlation_id()) {
        properties.insert("correlation_id".into(), c);
    }
    if let Some(r) = s(props.reply_to()) {
        properties.insert("reply_to".into(), r);
    }
    properties.insert(
        "delivery_mode".into(),
        Value::from(props.delivery_mode().unwrap_or(2)),
    );
    properties.insert(
        "delivery_info".into(),
        serde_json::json!({"exchange": exchange, "routing_key": routing_key}),
    );
    properties.insert(
        "priority".into(),
        Value::from(props.priority().unwrap_or(0)),
    );
    properties.insert("body_encoding".into(), "base64".into());
    let env = serde_json::json!({
        "body": base64::engine::general_purpose::STANDARD.encode(body),
        "content-encoding": s(props.content_encoding()).unwrap_or_else(|| "utf-8".into()),
        "content-type": s(props.content_type()).unwrap_or_else(|| "application/json".into()),
        "headers": headers,
        "properties": properties,
    });
    celeriac_protocol::json::to_vec(&env)
}

/// The AMQP body and properties of a kombu envelope (events and pidbox replies are built as envelopes by
/// the worker; AMQP sends their parts natively).
pub fn from_envelope(
    raw: &[u8],
    delivery_mode: u8,
) -> Result<(Vec<u8>, BasicProperties), ProtocolError> {
    let env = celeriac_protocol::envelope::Envelope::parse(raw)?;
    let body = env.body_bytes()?;
    let mut props = BasicProperties::default()
        .with_content_type(
            env.content_type
                .as_deref()
                .unwrap_or("application/json")
                .into(),
        )
        .with_content_encoding(env.content_encoding.as_deref().unwrap_or("utf-8").into())
        .with_headers(to_table(&env.headers))
        .with_delivery_mode(delivery_mode);
    if let Some(c) = env.properties.get("correlation_id").and_then(Value::as_str) {
        props = props.with_correlation_id(c.into());
    }
    if let Some(r) = env.properties.get("reply_to").and_then(Value::as_str) {
        props = props.with_reply_to(r.into());
    }
    Ok((body, props))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn py_amqp_types() {
        assert_eq!(to_amqp(&json!(5)), AMQPValue::LongInt(5));
        assert_eq!(
            to_amqp(&json!(5_000_000_000i64)),
            AMQPValue::LongLongInt(5_000_000_000)
        );
        assert_eq!(to_amqp(&json!(1.5)), AMQPValue::Double(1.5));
        assert_eq!(to_amqp(&json!(null)), AMQPValue::Void);
        assert_eq!(to_amqp(&json!(true)), AMQPValue::Boolean(true));
        assert_eq!(
            to_amqp(&json!("x")),
            AMQPValue::LongString(LongString::from("x".as_bytes()))
        );
    }

    #[test]
    fn headers_roundtrip_through_a_table() {
        let v = json!({"lang": "py", "retries": 0, "timelimit": [null, 1.5], "stamps": {}, "group_index": null,
                       "ignore_result": false, "big": 9_007_199_254_740_993i64,
                       "beyond_i64": 14_507_327_383_470_079_999u64});
        let back = Value::Object(from_table(&to_table(v.as_object().unwrap())));
        assert_eq!(back, v);
    }

    #[test]
    fn task_roundtrip() {
        let mut m = TaskMessage::new(
            "tasks.add",
            "d0b5b6a4-0000-4000-8000-000000000001",
            vec![json!(2), json!(3)],
            Map::new(),
        );
        m.properties.reply_to = Some("r-1".into());
        m.properties.expiration = Some("5000".into());
        m.properties.priority = 7;
        let (body, props) = encode_task(&m);
        assert_eq!(
            String::from_utf8(body.clone()).unwrap(),
            r#"[[2, 3], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#
        );
        assert_eq!(props.expiration().as_ref().unwrap().as_str(), "5000");
        let back = decode_task(&props, &body).unwrap();
        assert_eq!(back.id(), m.id());
        assert_eq!(back.args, m.args);
        assert_eq!(back.properties.priority, 7);
        assert_eq!(back.properties.reply_to.as_deref(), Some("r-1"));
        assert_eq!(back.headers.to_value(), m.headers.to_value());
    }

    #[test]
    fn envelope_roundtrip() {
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_headers(to_table(json!({"clock": 3}).as_object().unwrap()));
        let env = to_envelope(&props, br#"{"method": "ping"}"#, "celery.pidbox", "");
        let (body, back) = from_envelope(&env, 1).unwrap();
        assert_eq!(body, br#"{"method": "ping"}"#);
        assert_eq!(
            from_table(back.headers().as_ref().unwrap()),
            *json!({"clock": 3}).as_object().unwrap()
        );
    }
}
