//! Integration tests of the Redis transport against the local Redis (`CELERIAC_TEST_REDIS`, default
//! `redis://127.0.0.1:6379/0`). Every test works under its own `global_keyprefix`, so tests and CI runs never
//! see each other's keys.

use celeriac_broker::prelude::*;
use celeriac_broker::redis::RedisBroker;
use celeriac_broker::url::{BrokerUrl, RedisTarget};
use celeriac_broker::{BrokerOptions, QueueOrder};
use celeriac_protocol::{TaskMessage, Value};
use redis::AsyncCommands;
use serde_json::{Map, json};
use std::time::Duration;

fn url() -> String {
    std::env::var("CELERIAC_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

fn target() -> RedisTarget {
    match BrokerUrl::parse(&url()).unwrap() {
        BrokerUrl::Redis(t) => t,
        _ => panic!("CELERIAC_TEST_REDIS must be a redis:// URL"),
    }
}

struct Fixture {
    broker: RedisBroker,
    prefix: String,
    conn: redis::aio::MultiplexedConnection,
}

impl Fixture {
    async fn new(options: BrokerOptions) -> Self {
        let prefix = format!("t-{}:", uuid::Uuid::new_v4().simple());
        let broker = RedisBroker::connect(
            target(),
            BrokerOptions {
                global_keyprefix: prefix.clone(),
                ..options
            },
        )
        .await
        .unwrap();
        let conn = redis::Client::open(url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        Self {
            broker,
            prefix,
            conn,
        }
    }

    fn key(&self, k: &str) -> String {
        format!("{}{k}", self.prefix)
    }

    async fn cleanup(mut self) {
        let keys: Vec<String> = self.conn.keys(format!("{}*", self.prefix)).await.unwrap();
        if !keys.is_empty() {
            let _: () = self.conn.del(keys).await.unwrap();
        }
    }
}

fn task(name: &str, args: Vec<Value>) -> TaskMessage {
    TaskMessage::new(name, uuid::Uuid::new_v4().to_string(), args, Map::new())
}

const WAIT: Duration = Duration::from_millis(200);

#[tokio::test]
async fn publish_fetch_ack_in_kombu_layout() {
    let mut f = Fixture::new(BrokerOptions::default()).await;
    let q = vec!["q".to_string()];
    let m = task("bench.add", vec![json!(2), json!(3)]);
    f.broker.publish(&m, "q").await.unwrap();
    let members: Vec<Vec<u8>> = f
        .conn
        .smembers(f.key("_kombu.binding.celery"))
        .await
        .unwrap();
    assert_eq!(members, vec![b"q\x06\x16\x06\x16q".to_vec()]);
    let raw: Vec<Vec<u8>> = f.conn.lrange(f.key("q"), 0, -1).await.unwrap();
    assert_eq!(raw.len(), 1);
    let env: Value = serde_json::from_slice(&raw[0]).unwrap();
    let keys: Vec<&String> = env.as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        [
            "body",
            "content-encoding",
            "content-type",
            "headers",
            "properties"
        ]
    );
    assert_eq!(
        env["properties"]["delivery_info"],
        json!({"exchange": "", "routing_key": "q"})
    );

    let before = unix_now().floor();
    let got = f.broker.fetch(&q, 10, &[], WAIT).await.unwrap();
    let after = unix_now().ceil();
    assert_eq!(got.len(), 1);
    let d = &got[0];
    assert_eq!(d.message.as_ref().unwrap().id(), m.id());
    assert_eq!(
        (
            d.held.queue.as_str(),
            d.held.routing_key.as_str(),
            d.held.redelivered
        ),
        ("q", "q", false)
    );
    // Recorded as kombu records it: unacked[tag] = [envelope, exchange, routing_key].
    let stored: Vec<u8> = f.conn.hget(f.key("unacked"), &d.held.tag).await.unwrap();
    let (stored_env, ex, rk): (Value, String, String) = serde_json::from_slice(&stored).unwrap();
    assert_eq!((stored_env, ex.as_str(), rk.as_str()), (env, "", "q"));
    let score: Option<f64> = f
        .conn
        .zscore(f.key("unacked_index"), &d.held.tag)
        .await
        .unwrap();
    // An hour's visibility timeout: the lease is scored in whole seconds, rounded up.
    let score = score.expect("leased");
    assert_eq!(score.fract(), 0.0);
    assert!(
        (before..=after).contains(&score),
        "{before} <= {score} <= {after}"
    );

    f.broker
        .ack(std::slice::from_ref(&d.held.tag))
        .await
        .unwrap();
    let n: u64 = f.conn.hlen(f.key("unacked")).await.unwrap();
    let z: u64 = f.conn.zcard(f.key("unacked_index")).await.unwrap();
    assert_eq!((n, z), (0, 0));
    f.cleanup().await;
}

#[tokio::test]
async fn priorities_and_queue_order() {
    let f = Fixture::new(BrokerOptions::default()).await;
    let mut sent = Vec::new();
    for (queue, priority) in [
        ("bulk", 0),
        ("realtime", 9),
        ("realtime", 0),
        ("realtime", 5),
    ] {
        let mut m = task("bench.noop", vec![]);
        m.properties.priority = priority;
        f.broker.publish(&m, queue).await.unwrap();
        sent.push((queue, priority, m.id().to_string()));
    }
    let queues = vec!["realtime".to_string(), "bulk".to_string()];
    let mut order = Vec::new();
    for _ in 0..4 {
        let got = f.broker.fetch(&queues, 1, &[], WAIT).await.unwrap();
        let d = &got[0];
        let id = d.message.as_ref().unwrap().id().to_string();
        order.push(sent.iter().find(|s| s.2 == id).map(|s| (s.0, s.1)).unwrap());
        f.broker
            .ack(std::slice::from_ref(&d.held.tag))
            .await
            .unwrap();
    }
    // realtime before bulk; on Redis a lower priority number is served first.
    assert_eq!(
        order,
        [
            ("realtime", 0),
            ("realtime", 5),
            ("realtime", 9),
            ("bulk", 0)
        ]
    );
    assert_eq!(f.broker.queue_length("realtime").await.unwrap(), 0);
    f.cleanup().await;
}

#[tokio::test]
async fn weighted_order_gives_each_queue_its_share() {
    let f = Fixture::new(BrokerOptions {
        queue_order: QueueOrder::Weighted(vec![3, 1]),
        ..Default::default()
    })
    .await;
    for _ in 0..10 {
        f.broker
            .publish(&task("bench.noop", vec![]), "a")
            .await
            .unwrap();
        f.broker
            .publish(&task("bench.noop", vec![]), "b")
            .await
            .unwrap();
    }
    let got = f
        .broker
        .fetch(&["a".to_string(), "b".to_string()], 8, &[], WAIT)
        .await
        .unwrap();
    let from_a = got.iter().filter(|d| d.held.queue == "a").count();
    assert_eq!((got.len(), from_a), (8, 6));
    f.cleanup().await;
}

#[tokio::test]
async fn batch_fetch_is_bounded_and_fifo() {
    let f = Fixture::new(BrokerOptions::default()).await;
    let mut ids = Vec::new();
    for i in 0..25 {
        let m = task("bench.echo", vec![json!(i)]);
        ids.push(m.id().to_string());
        f.broker.publish(&m, "q").await.unwrap();
    }
    let got = f
        .broker
        .fetch(&["q".to_string()], 10, &[], WAIT)
        .await
        .unwrap();
    let got_ids: Vec<String> = got
        .iter()
        .map(|d| d.message.as_ref().unwrap().id().to_string())
        .collect();
    assert_eq!(got_ids, ids[..10]);
    assert_eq!(f.broker.queue_length("q").await.unwrap(), 15);
    assert_eq!(f.broker.purge("q").await.unwrap(), 15);
    f.cleanup().await;
}

#[tokio::test]
async fn idle_fetch_blocks_then_wakes() {
    let f = Fixture::new(BrokerOptions::default()).await;
    let q = vec!["q".to_string()];
    assert!(f.broker.fetch(&q, 4, &[], WAIT).await.unwrap().is_empty());
    let publisher = RedisBroker::connect(
        target(),
        BrokerOptions {
            global_keyprefix: f.prefix.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let m = task("bench.noop", vec![]);
    let id = m.id().to_string();
    let send = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        publisher.publish(&m, "q").await.unwrap();
    });
    let got = f
        .broker
        .fetch(&q, 4, &[], Duration::from_secs(5))
        .await
        .unwrap();
    send.await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message.as_ref().unwrap().id(), id);
    let n: u64 = redis::Client::open(url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
        .hlen(f.key("unacked"))
        .await
        .unwrap();
    assert_eq!(n, 1, "a message popped by BRPOP is recorded as unacked");
    f.cleanup().await;
}

#[tokio::test]
async fn requeue_back_and_restore_front_mark_redelivered() {
    let mut f = Fixture::new(BrokerOptions::default()).await;
    let q = vec!["q".to_string()];
    let (a, b) = (
        task("bench.noop", vec![json!("a")]),
        task("bench.noop", vec![json!("b")]),
    );
    f.broker.publish(&a, "q").await.unwrap();
    f.broker.publish(&b, "q").await.unwrap();
    let got = f.broker.fetch(&q, 1, &[], WAIT).await.unwrap();
    assert_eq!(got[0].message.as_ref().unwrap().id(), a.id());
    // reject(requeue=True): LPUSH, behind b.
    assert_eq!(f.broker.requeue(&[&got[0].held], false).await.unwrap(), 1);
    let got = f.broker.fetch(&q, 2, &[], WAIT).await.unwrap();
    let ids: Vec<&str> = got
        .iter()
        .map(|d| d.message.as_ref().unwrap().id())
        .collect();
    assert_eq!(ids, [b.id(), a.id()]);
    assert!(got[1].held.redelivered);
    // restore: RPUSH, next in line; a second restore of the same tag is a no-op.
    assert_eq!(f.broker.requeue(&[&got[1].held], true).await.unwrap(), 1);
    assert_eq!(f.broker.requeue(&[&got[1].held], true).await.unwrap(), 0);
    let raw: Vec<Vec<u8>> = f.conn.lrange(f.key("q"), 0, -1).await.unwrap();
    assert_eq!(raw.len(), 1);
    let env: Value = serde_json::from_slice(&raw[0]).unwrap();
    assert_eq!(env["headers"]["redelivered"], json!(true));
    assert_eq!(
        env["properties"]["delivery_info"]["redelivered"],
        json!(true)
    );
    f.cleanup().await;
}

#[tokio::test]
async fn visibility_timeout_restores_only_expired_leases() {
    let f = Fixture::new(BrokerOptions {
        visibility_timeout: Duration::from_millis(600),
        ..Default::default()
    })
    .await;
    let q = vec!["q".to_string()];
    f.broker
        .publish(&task("bench.noop", vec![json!(1)]), "q")
        .await
        .unwrap();
    f.broker
        .publish(&task("bench.noop", vec![json!(2)]), "q")
        .await
        .unwrap();
    let got = f.broker.fetch(&q, 2, &[], WAIT).await.unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(
        f.broker.restore_visible().await.unwrap(),
        0,
        "leases still valid"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    f.broker
        .renew(std::slice::from_ref(&got[0].held.tag))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    // The renewed one is still ours; the other (as from a crashed worker) goes back.
    assert_eq!(f.broker.restore_visible().await.unwrap(), 1);
    let again = f.broker.fetch(&q, 2, &[], WAIT).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].message.as_ref().unwrap().args, vec![json!(2)]);
    assert!(again[0].held.redelivered);
    f.cleanup().await;
}

#[tokio::test]
async fn garbage_is_dead_lettered_not_dropped() {
    let mut f = Fixture::new(BrokerOptions::default()).await;
    let q = vec!["q".to_string()];
    let _: () = f.conn.lpush(f.key("q"), "not json at all").await.unwrap();
    let bad_body = json!({"body": "eyJ4IjogMX0=", "content-encoding": "utf-8", "content-type": "application/json",
        "headers": {"task": "bench.add", "id": "x1"},
        "properties": {"delivery_info": {"exchange": "", "routing_key": "q"}, "priority": 0, "body_encoding": "base64", "delivery_tag": "tag-x1"}});
    let _: () = f
        .conn
        .lpush(f.key("q"), serde_json::to_vec(&bad_body).unwrap())
        .await
        .unwrap();
    let got = f.broker.fetch(&q, 10, &[], WAIT).await.unwrap();
    // The non-JSON envelope never reaches the worker: it is already in the dead-letter list.
    assert_eq!(got.len(), 1);
    let err = got[0].message.as_ref().unwrap_err().to_string();
    assert_eq!(err, "malformed body: expected [args, kwargs, embed]");
    f.broker.dead_letter(&got[0].held, &err).await.unwrap();
    let entries: Vec<Vec<u8>> = f
        .conn
        .lrange(f.key("celeriac.deadletter.q"), 0, -1)
        .await
        .unwrap();
    assert_eq!(entries.len(), 2);
    let newest: Value = serde_json::from_slice(&entries[0]).unwrap();
    assert_eq!(newest["reason"], json!(err));
    assert_eq!(newest["queue"], json!("q"));
    assert_eq!(
        serde_json::from_str::<Value>(newest["raw"].as_str().unwrap()).unwrap(),
        bad_body
    );
    let oldest: Value = serde_json::from_slice(&entries[1]).unwrap();
    assert_eq!(oldest["raw"], json!("not json at all"));
    assert_eq!(oldest["queue"], json!("q"));
    assert!(
        oldest["reason"]
            .as_str()
            .unwrap()
            .contains("not valid JSON")
    );
    assert!(oldest["at"].as_str().unwrap().starts_with("20"));
    let n: u64 = f.conn.hlen(f.key("unacked")).await.unwrap();
    assert_eq!(n, 0);
    f.cleanup().await;
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}
