//! Golden tests against traffic captured from Python Celery 5.7 and 5.5.3 clients (copies of
//! `shared/spec/captures`). Each decoded LPUSH line is turned back into its exact wire bytes (the body is
//! base64 of Python's JSON of the decoded body); we decode those bytes and must re-encode them identically.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use celeriac_protocol::envelope::{Envelope, encode_task};
use celeriac_protocol::{ResultMeta, State, Value, json};

/// Every decoded envelope (`{"body": {"__decoded_base64__": ...}, ...}`) in a capture, as exact wire bytes.
fn envelopes(capture: &str) -> Vec<Vec<u8>> {
    let text = std::fs::read_to_string(format!(
        "{}/tests/captures/{capture}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    text.lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with(r#"{"body": {"__decoded_base64__""#))
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            let body = json::to_vec(&v["body"]["__decoded_base64__"]);
            v["body"] = Value::String(STANDARD.encode(body));
            json::to_vec(&v)
        })
        .collect()
}

fn roundtrip(capture: &str) -> usize {
    let all = envelopes(capture);
    assert!(!all.is_empty(), "{capture}: no envelopes found");
    let mut checked = 0;
    for raw in all {
        let env = Envelope::parse(&raw).unwrap();
        if !env.headers.contains_key("task") {
            continue; // protocol 1: covered below
        }
        let tag = env.delivery_tag().unwrap().to_string();
        let (ex, rk) = env.route();
        let (ex, rk) = (ex.to_string(), rk.to_string());
        let msg = env
            .into_task()
            .unwrap_or_else(|e| panic!("{capture}: {e}\n{}", String::from_utf8_lossy(&raw)));
        let again = encode_task(&msg, &ex, &rk, &tag);
        assert_eq!(
            String::from_utf8(again).unwrap(),
            String::from_utf8(raw).unwrap(),
            "{capture}"
        );
        checked += 1;
    }
    checked
}

#[test]
fn celery_5_7_client_variants_roundtrip_byte_exact() {
    // countdown, eta, expires (with `expiration`), priority, time limits, shadow, unicode kwargs, link,
    // link_error, chain, group, chord, queue, retries.
    assert!(roundtrip("wire-redis-client-send-variants.txt") >= 15);
}

#[test]
fn celery_5_5_client_roundtrips_byte_exact() {
    assert!(roundtrip("wire-redis-client-5.5.3-send.txt") >= 1);
}

#[test]
fn worker_capture_messages_roundtrip() {
    assert!(roundtrip("wire-redis-worker-plain-task.txt") >= 1);
}

#[test]
fn unicode_kwargs_match_celery_repr_and_escapes() {
    let raw = envelopes("wire-redis-client-send-variants.txt")
        .into_iter()
        .find(|r| String::from_utf8_lossy(r).contains(r#""kwargsrepr": "{'k'"#))
        .expect("the kwargs variant");
    let msg = Envelope::parse(&raw).unwrap().into_task().unwrap();
    assert_eq!(msg.kwargs["u"], Value::String("ü".into()));
    // Our repr of the same kwargs is what Celery put in the header.
    assert_eq!(
        celeriac_protocol::repr::kwargs_repr(&msg.kwargs),
        msg.headers.kwargsrepr.clone().unwrap()
    );
    assert!(String::from_utf8_lossy(&raw).contains(r#"'u': '\u00fc'"#));
}

#[test]
fn protocol_1_messages_decode_to_v2_shape() {
    let all = envelopes("wire-redis-protocol-v1.txt");
    let v1: Vec<_> = all
        .iter()
        .filter(|r| Envelope::parse(r).unwrap().headers.is_empty())
        .map(|r| Envelope::parse(r).unwrap().into_task().unwrap())
        .collect();
    assert!(!v1.is_empty());
    let m = &v1[0];
    assert_eq!(m.protocol, 1);
    assert_eq!(m.task(), "tasks.add");
    assert_eq!(m.args, vec![Value::from(4), Value::from(5)]);
    assert_eq!(m.headers.argsrepr.as_deref(), Some("(4, 5)"));
    assert_eq!(
        m.headers.eta.as_deref(),
        Some("2026-11-21T04:21:45.324175+00:00")
    );
    let callbacks = m.embed.callbacks.as_ref().unwrap();
    assert_eq!(callbacks[0]["task"], Value::from("tasks.mul"));
    assert_eq!(callbacks[0]["args"], serde_json::json!([2]));
}

#[test]
fn result_meta_bytes_match_worker_capture() {
    let text = std::fs::read_to_string(format!(
        "{}/tests/captures/wire-redis-worker-plain-task.txt",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let stored = text
        .lines()
        .map(str::trim_start)
        .find(|l| l.starts_with(r#"{"status": "SUCCESS""#))
        .expect("a stored SUCCESS meta");
    let v: Value = serde_json::from_str(stored).unwrap();
    let mut m = ResultMeta::new(
        v["task_id"].as_str().unwrap(),
        State::Success,
        v["result"].clone(),
    );
    m.date_done = v["date_done"].as_str().map(str::to_string);
    assert_eq!(String::from_utf8(m.to_json()).unwrap(), stored);
}

#[test]
fn the_consumers_one_pass_decoding_matches_the_maps_on_every_capture() {
    let mut checked = 0;
    for capture in [
        "wire-redis-client-send-variants.txt",
        "wire-redis-client-5.5.3-send.txt",
        "wire-redis-worker-plain-task.txt",
        "wire-redis-protocol-v1.txt",
    ] {
        for raw in envelopes(capture) {
            let env = Envelope::parse(&raw).unwrap();
            let (ex, rk) = env.route();
            let (ex, rk, redelivered) = (ex.to_string(), rk.to_string(), env.redelivered());
            let by_maps = env.into_task();
            let typed = celeriac_protocol::receive::receive(&raw).unwrap();
            assert_eq!(
                (typed.exchange, typed.routing_key, typed.redelivered),
                (ex, rk, redelivered),
                "{capture}"
            );
            match (typed.message, by_maps) {
                (Ok(typed), Ok(by_maps)) => {
                    assert_eq!(typed, by_maps, "{capture}");
                    checked += 1;
                }
                (typed, by_maps) => assert_eq!(format!("{typed:?}"), format!("{by_maps:?}")),
            }
        }
    }
    assert!(checked >= 20, "{checked}");
}
