//! The RabbitMQ transport against a real RabbitMQ (`CELERIAC_TEST_AMQP`, default
//! `amqp://guest:guest@127.0.0.1:5672//`). Every test uses its own queue names and deletes them.

use celeriac_broker::amqp::AmqpBroker;
use celeriac_broker::prelude::*;
use celeriac_broker::url::{BrokerUrl, parse_amqp};
use celeriac_broker::{BrokerError, BrokerOptions};
use celeriac_protocol::TaskMessage;
use lapin::options::{BasicPublishOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::time::{Duration, Instant};

fn url() -> String {
    std::env::var("CELERIAC_TEST_AMQP")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672//".into())
}

fn uri() -> String {
    match BrokerUrl::parse(&url()).unwrap() {
        BrokerUrl::Amqp(u) => u,
        _ => panic!("CELERIAC_TEST_AMQP must be an amqp:// URL"),
    }
}

fn unique(name: &str) -> String {
    format!(
        "t-{name}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// Deletes the named queues when dropped (also when the test fails).
struct Cleanup(Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let queues = std::mem::take(&mut self.0);
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let conn = Connection::connect(&uri(), ConnectionProperties::default())
                    .await
                    .unwrap();
                for q in queues {
                    let ch = conn.create_channel().await.unwrap();
                    let _ = ch
                        .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                        .await;
                }
                let _ = conn.close(200, "ok".into()).await;
            });
        })
        .join()
        .unwrap();
    }
}

async fn broker(options: BrokerOptions) -> AmqpBroker {
    AmqpBroker::connect(uri(), options).await.unwrap()
}

fn task(name: &str, args: Vec<Value>) -> TaskMessage {
    TaskMessage::new(name, uuid::Uuid::new_v4().to_string(), args, Map::new())
}

/// Fetches until `n` deliveries came (or 10 s passed).
async fn fetch_n(b: &AmqpBroker, queues: &[String], n: usize) -> Vec<celeriac_broker::Delivery> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while out.len() < n && Instant::now() < deadline {
        out.extend(
            b.fetch(queues, n - out.len(), &[], Duration::from_millis(500))
                .await
                .unwrap(),
        );
    }
    out
}

#[tokio::test]
async fn publish_fetch_ack_roundtrip() {
    let q = unique("rt");
    let _c = Cleanup(vec![q.clone()]);
    let b = broker(BrokerOptions::default()).await;
    b.declare(std::slice::from_ref(&q)).await.unwrap();
    let mut m = task("tasks.add", vec![json!(2), json!(3)]);
    m.properties.reply_to = Some("reply-q".into());
    b.publish(&m, &q).await.unwrap();
    let got = fetch_n(&b, std::slice::from_ref(&q), 1).await;
    assert_eq!(got.len(), 1);
    let d = &got[0];
    let msg = d.message.as_ref().unwrap();
    assert_eq!(msg.id(), m.id());
    assert_eq!(msg.args, vec![json!(2), json!(3)]);
    assert_eq!(msg.properties.reply_to.as_deref(), Some("reply-q"));
    assert_eq!(d.held.queue, q);
    assert_eq!(d.held.routing_key, q);
    assert!(!d.held.redelivered);
    b.ack(std::slice::from_ref(&d.held.tag)).await.unwrap();
    // Nothing left: not ready, not unacked (a reconnect would not bring it back).
    b.close().await;
    let b = broker(BrokerOptions::default()).await;
    assert_eq!(b.queue_length(&q).await.unwrap(), 0);
    let again = b
        .fetch(std::slice::from_ref(&q), 1, &[], Duration::from_millis(500))
        .await
        .unwrap();
    assert!(again.is_empty());
}

#[tokio::test]
async fn requeue_redelivers_with_the_flag() {
    let q = unique("rq");
    let _c = Cleanup(vec![q.clone()]);
    let b = broker(BrokerOptions::default()).await;
    let m = task("tasks.x", vec![]);
    b.publish(&m, &q).await.unwrap();
    let first = fetch_n(&b, std::slice::from_ref(&q), 1).await;
    assert_eq!(first.len(), 1);
    assert_eq!(b.requeue(&[&first[0].held], true).await.unwrap(), 1);
    let second = fetch_n(&b, std::slice::from_ref(&q), 1).await;
    assert_eq!(second.len(), 1);
    assert!(second[0].held.redelivered);
    assert_eq!(second[0].message.as_ref().unwrap().id(), m.id());
    b.ack(&[second[0].held.tag.clone()]).await.unwrap();
}

#[tokio::test]
async fn realtime_is_served_before_bulk() {
    let (rt, bulk) = (unique("prio-rt"), unique("prio-bulk"));
    let _c = Cleanup(vec![rt.clone(), bulk.clone()]);
    let b = broker(BrokerOptions::default()).await;
    for i in 0..3 {
        b.publish(&task("bulk", vec![json!(i)]), &bulk)
            .await
            .unwrap();
    }
    for i in 0..3 {
        b.publish(&task("rt", vec![json!(i)]), &rt).await.unwrap();
    }
    let queues = vec![rt.clone(), bulk.clone()];
    // Start the consumers, let both prefetch, then take in priority order.
    let none = b.fetch(&queues, 0, &[], Duration::ZERO).await.unwrap();
    assert!(none.is_empty());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = b
        .fetch(&queues, 6, &[], Duration::from_secs(1))
        .await
        .unwrap();
    let names: Vec<&str> = got
        .iter()
        .map(|d| d.message.as_ref().unwrap().task())
        .collect();
    assert_eq!(names, ["rt", "rt", "rt", "bulk", "bulk", "bulk"]);
    let tags: Vec<String> = got.iter().map(|d| d.held.tag.clone()).collect();
    b.ack(&tags).await.unwrap();
}

#[tokio::test]
async fn full_queue_is_a_back_pressure_error() {
    let q = unique("full");
    let _c = Cleanup(vec![q.clone()]);
    let mut args = Map::new();
    args.insert("x-max-length".into(), json!(2));
    args.insert("x-overflow".into(), json!("reject-publish"));
    let b = broker(BrokerOptions {
        queue_arguments: HashMap::from([(q.clone(), args)]),
        ..Default::default()
    })
    .await;
    b.publish(&task("t", vec![]), &q).await.unwrap();
    b.publish(&task("t", vec![]), &q).await.unwrap();
    let err = b.publish(&task("t", vec![]), &q).await.unwrap_err();
    assert!(
        matches!(&err, BrokerError::QueueFull { queue } if *queue == q),
        "{err}"
    );
    assert!(err.to_string().contains("is full"), "{err}");
    assert_eq!(b.queue_length(&q).await.unwrap(), 2);
}

#[tokio::test]
async fn a_queue_with_other_arguments_is_named_in_the_error() {
    let q = unique("mismatch");
    let _c = Cleanup(vec![q.clone()]);
    let with_len = |n: i64| {
        let mut args = Map::new();
        args.insert("x-max-length".into(), json!(n));
        BrokerOptions {
            queue_arguments: HashMap::from([(q.clone(), args)]),
            ..Default::default()
        }
    };
    let a = broker(with_len(10)).await;
    a.declare(std::slice::from_ref(&q)).await.unwrap();
    let b = broker(with_len(20)).await;
    let err = b.declare(std::slice::from_ref(&q)).await.unwrap_err();
    match &err {
        BrokerError::QueueMismatch {
            queue,
            argument,
            ours,
            theirs,
        } => {
            assert_eq!(queue, &q);
            assert_eq!(argument, "x-max-length");
            assert_eq!(ours, "20");
            assert!(theirs.contains("10"), "{theirs}");
        }
        other => panic!("expected QueueMismatch, got {other}"),
    }
    // The broker stays usable after the refused declaration.
    b.ping().await.unwrap();
    assert_eq!(b.queue_length(&q).await.unwrap(), 0);
}

#[tokio::test]
async fn undecodable_messages_are_dead_lettered_with_the_reason() {
    let q = unique("garbage");
    let dead = format!("celeriac.deadletter.{q}");
    let _c = Cleanup(vec![q.clone(), dead.clone()]);
    let b = broker(BrokerOptions::default()).await;
    b.declare(std::slice::from_ref(&q)).await.unwrap();
    let conn = Connection::connect(&uri(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.basic_publish(
        "".into(),
        q.as_str().into(),
        BasicPublishOptions::default(),
        b"\xff not json",
        BasicProperties::default().with_content_type("application/json".into()),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let got = fetch_n(&b, std::slice::from_ref(&q), 1).await;
    assert_eq!(got.len(), 1);
    let reason = got[0].message.as_ref().unwrap_err().to_string();
    b.dead_letter(&got[0].held, &reason).await.unwrap();
    let m = ch
        .basic_get(
            dead.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .expect("dead-lettered message");
    assert_eq!(m.delivery.data, b"\xff not json");
    let headers = m.delivery.properties.headers().clone().unwrap();
    let h = celeriac_broker::amqp::table::from_table(&headers);
    assert_eq!(h["x-celeriac-reason"], json!(reason));
    assert_eq!(h["x-celeriac-queue"], json!(q));
    let _ = conn.close(200, "ok".into()).await;
    assert_eq!(b.queue_length(&q).await.unwrap(), 0);
}

#[tokio::test]
async fn parked_eta_messages_come_back_when_due() {
    let q = unique("park");
    let _c = Cleanup(vec![q.clone()]);
    let b = broker(BrokerOptions::default()).await;
    let m = task("tasks.later", vec![json!("x")]);
    b.publish(&m, &q).await.unwrap();
    let got = fetch_n(&b, std::slice::from_ref(&q), 1).await;
    // Whole seconds, rounded down: 2.5 s ahead comes back after 2 s (the worker holds the rest in memory).
    let due = chrono::Utc::now() + chrono::Duration::milliseconds(2500);
    let parked_at = Instant::now();
    assert!(b.park(&got[0].held, due).await.unwrap());
    assert_eq!(b.queue_length(&q).await.unwrap(), 0);
    let back = fetch_n(&b, std::slice::from_ref(&q), 1).await;
    assert_eq!(back.len(), 1);
    assert!(parked_at.elapsed() >= Duration::from_millis(1900));
    let msg = back[0].message.as_ref().unwrap();
    assert_eq!(msg.id(), m.id());
    assert_eq!(msg.args, vec![json!("x")]);
    assert_eq!(back[0].held.queue, q);
    b.ack(&[back[0].held.tag.clone()]).await.unwrap();
}

#[tokio::test]
async fn revoked_ids_persist_for_later_workers() {
    let id = uuid::Uuid::new_v4().to_string();
    let a = broker(BrokerOptions::default()).await;
    a.add_revoked(std::slice::from_ref(&id), Duration::from_secs(60))
        .await
        .unwrap();
    a.close().await;
    let b = broker(BrokerOptions::default()).await;
    assert!(b.revoked().await.unwrap().contains(&id));
    // Reading does not consume: a third worker sees it too.
    assert!(b.revoked().await.unwrap().contains(&id));
}

#[tokio::test]
async fn remote_control_request_and_reply() {
    use futures::StreamExt;
    let node = format!("{}@test", unique("node"));
    let worker = broker(BrokerOptions {
        node_name: Some(node.clone()),
        ..Default::default()
    })
    .await;
    let mut requests = worker.control_requests().await.unwrap();
    let client = broker(BrokerOptions::default()).await;
    let oid = uuid::Uuid::new_v4().to_string();
    let ticket = uuid::Uuid::new_v4().to_string();
    let request = json!({"method": "ping", "arguments": {}, "destination": [node],
        "pattern": null, "matcher": null, "ticket": ticket,
        "reply_to": {"exchange": "reply.celery.pidbox", "routing_key": oid}});
    let envelope = |body: &Value, headers: Value| {
        use base64::Engine;
        celeriac_protocol::json::to_vec(&json!({
            "body": base64::engine::general_purpose::STANDARD.encode(celeriac_protocol::json::to_vec(body)),
            "content-encoding": "utf-8", "content-type": "application/json", "headers": headers,
            "properties": {"body_encoding": "base64"}}))
    };
    let req_env = envelope(&request, json!({"clock": 1}));
    let served = tokio::spawn(async move {
        let raw = requests.next().await.unwrap();
        let env = celeriac_protocol::envelope::Envelope::parse(&raw).unwrap();
        let body: Value = serde_json::from_slice(&env.body_bytes().unwrap()).unwrap();
        assert_eq!(body["method"], "ping");
        let rk = body["reply_to"]["routing_key"]
            .as_str()
            .unwrap()
            .to_string();
        let reply = envelope(
            &json!({node.clone(): {"ok": "pong"}}),
            json!({"ticket": body["ticket"], "clock": 2}),
        );
        worker.control_reply(&rk, &reply).await.unwrap();
        worker
    });
    let replies = client
        .control_call(&req_env, &oid, Duration::from_secs(2), Some(1))
        .await
        .unwrap();
    let _worker = served.await.unwrap();
    assert_eq!(replies.len(), 1);
    let env = celeriac_protocol::envelope::Envelope::parse(&replies[0]).unwrap();
    assert_eq!(env.headers["ticket"], json!(ticket));
    let body: Value = serde_json::from_slice(&env.body_bytes().unwrap()).unwrap();
    assert_eq!(
        body.as_object().unwrap().values().next().unwrap(),
        &json!({"ok": "pong"})
    );
}

/// Closes this test's connection from the server side, as `rabbitmqctl close_all_connections` would.
fn close_connection_named(name: &str) -> bool {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "pid", "client_properties"])
        .output();
    let Ok(out) = out else { return false };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut closed = false;
    for line in text.lines().filter(|l| l.contains(name)) {
        let pid = line.split_whitespace().next().unwrap_or_default();
        closed |= std::process::Command::new("rabbitmqctl")
            .args(["-q", "close_connection", pid, "test: connection closed"])
            .status()
            .is_ok_and(|s| s.success());
    }
    closed
}

#[tokio::test]
async fn reconnects_and_resumes_consuming_after_the_connection_is_closed() {
    if std::process::Command::new("rabbitmqctl")
        .arg("-q")
        .arg("status")
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        panic!("rabbitmqctl is needed to close the connection from the server side");
    }
    let q = unique("reconnect");
    let _c = Cleanup(vec![q.clone()]);
    let node = unique("reconnect-node");
    let b = broker(BrokerOptions {
        node_name: Some(node.clone()),
        ..Default::default()
    })
    .await;
    let queues = vec![q.clone()];
    let held = task("held", vec![]);
    b.publish(&held, &q).await.unwrap();
    let got = fetch_n(&b, &queues, 1).await;
    assert_eq!(got.len(), 1);
    assert!(close_connection_named(&format!("celeriac {node}")));
    let closed_at = Instant::now();
    // The held message goes back to the queue; consuming resumes on a new connection.
    let mut back = Vec::new();
    while back.is_empty() && closed_at.elapsed() < Duration::from_secs(10) {
        match b.fetch(&queues, 1, &[], Duration::from_millis(300)).await {
            Ok(d) => back.extend(d),
            Err(e) => {
                assert!(matches!(e, BrokerError::NotConnected(_)), "{e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let resumed = closed_at.elapsed();
    assert_eq!(back.len(), 1, "the unacked message came back");
    assert!(back[0].held.redelivered);
    assert_eq!(back[0].message.as_ref().unwrap().id(), held.id());
    assert!(
        resumed < Duration::from_secs(5),
        "resumed after {resumed:?}"
    );
    // An ack with the old connection's tag is harmless.
    b.ack(&[got[0].held.tag.clone()]).await.unwrap();
    b.ack(&[back[0].held.tag.clone()]).await.unwrap();
    // Publishing works on the new connection too.
    b.publish(&task("after", vec![]), &q).await.unwrap();
    let after = fetch_n(&b, &queues, 1).await;
    assert_eq!(after[0].message.as_ref().unwrap().task(), "after");
    b.ack(&[after[0].held.tag.clone()]).await.unwrap();
}

#[test]
fn kombu_url_forms() {
    assert_eq!(
        parse_amqp("amqp://guest:guest@127.0.0.1:5672//").unwrap(),
        "amqp://guest:guest@127.0.0.1:5672/%2F"
    );
    let _ = FieldTable::default();
}

#[tokio::test]
async fn events_reach_an_event_stream() {
    use futures::StreamExt;
    let b = broker(BrokerOptions::default()).await;
    let mut events = b.event_stream().await.unwrap();
    let marker = uuid::Uuid::new_v4().to_string();
    let envelope = {
        use base64::Engine;
        let body = celeriac_protocol::json::to_vec(&json!({"type": "task-sent", "uuid": marker}));
        celeriac_protocol::json::to_vec(&json!({
            "body": base64::engine::general_purpose::STANDARD.encode(body),
            "content-encoding": "utf-8", "content-type": "application/json",
            "headers": {"hostname": "test@node"}, "properties": {"body_encoding": "base64"}}))
    };
    b.publish_events(&[("task.sent".into(), envelope)])
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let raw = events.next().await.expect("stream open");
            let env = celeriac_protocol::envelope::Envelope::parse(&raw).unwrap();
            let body: Value = serde_json::from_slice(&env.body_bytes().unwrap()).unwrap();
            if body["uuid"] == json!(marker) {
                return (env, body);
            }
        }
    })
    .await
    .expect("the event within 5 s");
    assert_eq!(got.1["type"], "task-sent");
    assert_eq!(got.0.headers["hostname"], "test@node");
    assert_eq!(got.0.route(), ("celeryev", "task.sent"));
}

#[tokio::test]
async fn batched_acks_settle_exactly_the_acked_messages() {
    let (a, bq) = (unique("acks-a"), unique("acks-b"));
    let _c = Cleanup(vec![a.clone(), bq.clone()]);
    let b = broker(BrokerOptions::default()).await;
    for i in 0..10 {
        b.publish(&task("a", vec![json!(i)]), &a).await.unwrap();
        b.publish(&task("b", vec![json!(i)]), &bq).await.unwrap();
    }
    let queues = vec![a.clone(), bq.clone()];
    let got = fetch_n(&b, &queues, 20).await;
    assert_eq!(got.len(), 20);
    // Ack every other message (mixing both queues), keep the rest held: a `multiple` ack must not cover them.
    let (acked, kept): (Vec<_>, Vec<_>) = got.iter().enumerate().partition(|(i, _)| i % 2 == 0);
    let acked: Vec<String> = acked.iter().map(|(_, d)| d.held.tag.clone()).collect();
    b.ack(&acked).await.unwrap();
    // Give the kept ones back: exactly those come again.
    let kept: Vec<&celeriac_broker::Held> = kept.iter().map(|(_, d)| &d.held).collect();
    let kept_ids: std::collections::BTreeSet<String> = got
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, d)| d.message.as_ref().unwrap().id().to_string())
        .collect();
    assert_eq!(b.requeue(&kept, true).await.unwrap(), 10);
    let again = fetch_n(&b, &queues, 10).await;
    let again_ids: std::collections::BTreeSet<String> = again
        .iter()
        .map(|d| d.message.as_ref().unwrap().id().to_string())
        .collect();
    assert_eq!(again_ids, kept_ids);
    let tags: Vec<String> = again.iter().map(|d| d.held.tag.clone()).collect();
    b.ack(&tags).await.unwrap();
    b.ping().await.unwrap(); // an ack of an unknown tag would have closed the channel
    b.close().await;
    let fresh = broker(BrokerOptions::default()).await;
    assert_eq!(fresh.queue_length(&a).await.unwrap(), 0);
    assert_eq!(fresh.queue_length(&bq).await.unwrap(), 0);
}
