//! The bodies of the fuzz targets in `fuzz/` (cargo fuzz, nightly), as plain functions so that a stable test
//! (`tests/smoke.rs`, run by `make test`) drives them too. Each takes arbitrary bytes, feeds them to one
//! decoder the worker exposes to the outside, and checks invariants beyond "no panic": what decodes
//! re-encodes and decodes to the same value.
//!
//! Targets: [`envelope`] (kombu's Redis envelope and the task inside: protocol v1/v2, JSON, msgpack, YAML,
//! compressed bodies), [`message`] (a task message from transport parts), [`signature`] (signatures and
//! canvases), [`pidbox`] (remote-control requests), [`amqp_table`] (AMQP header tables), [`config`] (the TOML
//! configuration).

use celeriac_protocol::envelope::Envelope;
use celeriac_protocol::message::{TaskMessage, TaskProperties};
use serde_json::Value;

/// A kombu envelope as it arrives in a Redis list, and the task message inside.
pub fn envelope(data: &[u8]) {
    let by_maps = Envelope::parse(data).map(|env| {
        let (ex, rk) = env.route();
        let (ex, rk) = (ex.to_string(), rk.to_string());
        let _ = env.priority();
        let redelivered = env.redelivered();
        (ex, rk, redelivered, format!("{:?}", env.into_task()))
    });
    // The consumer's one-pass decoding gives the same outcome, errors included.
    let typed = celeriac_protocol::receive::receive(data).map(|r| {
        (
            r.exchange,
            r.routing_key,
            r.redelivered,
            format!("{:?}", r.message),
        )
    });
    assert_eq!(
        format!("{typed:?}"),
        format!("{by_maps:?}"),
        "{}",
        String::from_utf8_lossy(data)
    );
    let _ = celeriac_protocol::envelope::mark_redelivered(data);
}

/// A task message from its transport parts: the first byte picks the content type, the second the
/// compression; the rest is `headers JSON \0 body`.
pub fn message(data: &[u8]) {
    let [ct, comp, rest @ ..] = data else { return };
    let content_type = [
        "application/json",
        "application/x-msgpack",
        "application/x-yaml",
        "text/plain",
    ][*ct as usize % 4];
    let (headers, body) = match rest.iter().position(|b| *b == 0) {
        Some(at) => (&rest[..at], &rest[at + 1..]),
        None => (&rest[..0], rest),
    };
    let mut headers = match serde_json::from_slice::<Value>(headers) {
        Ok(Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    match comp % 3 {
        1 => {
            headers.insert("compression".into(), "application/x-gzip".into());
        }
        2 => {
            headers.insert("compression".into(), "application/x-bz2".into());
        }
        _ => {}
    }
    if let Ok(msg) = TaskMessage::decode(
        headers,
        TaskProperties::new("id"),
        content_type,
        "utf-8",
        body,
    ) {
        // What decodes re-encodes to a v2 body that decodes again.
        let body = msg.encode_body();
        let again = TaskMessage::decode(
            msg.headers
                .to_value()
                .as_object()
                .cloned()
                .unwrap_or_default(),
            TaskProperties::new("id"),
            "application/json",
            "utf-8",
            &body,
        );
        assert!(
            again.is_ok(),
            "re-encoded message does not decode: {again:?}"
        );
    }
}

/// A signature or canvas as a client sends it (`link`, `chord`, `chain` options, nested).
pub fn signature(data: &[u8]) {
    let Ok(mut value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let _ = serde_json::from_value::<celeriac_protocol::signature::Signature>(value.clone());
    let _ = celeriac_canvas::freeze(&mut value);
}

/// A remote-control request envelope, addressed (or not) to a worker named by the first input line.
pub fn pidbox(data: &[u8]) {
    let (name, raw) = match data.iter().position(|b| *b == b'\n') {
        Some(at) => (
            String::from_utf8_lossy(&data[..at]).into_owned(),
            &data[at + 1..],
        ),
        None => ("celery@host".to_string(), data),
    };
    let Ok(env) = Envelope::parse(raw) else {
        return;
    };
    let Ok(body) = env.body_bytes() else { return };
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return;
    };
    let _ = celeriac_protocol::pidbox::selected(&req, &name);
    if let Some(p) = req.get("pattern").and_then(Value::as_str) {
        let _ = celeriac_protocol::pidbox::glob(p, &name);
    }
}

/// An AMQP field table off the wire, converted to JSON and back: the round trip keeps the JSON.
pub fn amqp_table(data: &[u8]) {
    let Ok((_, table)) = amq_protocol_types::parsing::parse_field_table(data) else {
        return;
    };
    let json = celeriac_broker::amqp::table::from_table(&table);
    let back = celeriac_broker::amqp::table::to_table(&json);
    assert_eq!(celeriac_broker::amqp::table::from_table(&back), json);
}

/// The TOML configuration: any text either loads or is refused with a message.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = celeriac_worker::config::CeleryConfig::from_toml(text) {
        let _ = cfg.queue_arguments();
        let _ = cfg.common_queue_arguments();
    }
}
