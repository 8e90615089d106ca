//! Integration tests of the Redis result backend against the local Redis; each test uses its own key prefix.

use celeriac_backend::{BackendOptions, ResultBackend, redis::RedisBackend};
use celeriac_broker::url::parse_redis;
use celeriac_protocol::{ExceptionInfo, ResultMeta, State};
use futures::StreamExt;
use redis::AsyncCommands;
use serde_json::json;
use std::time::Duration;

fn url() -> String {
    std::env::var("CELERIAC_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

async fn backend(prefix: &str, expires: Option<Duration>) -> RedisBackend {
    RedisBackend::connect(
        parse_redis(&url()).unwrap(),
        BackendOptions {
            result_expires: expires,
            global_keyprefix: prefix.into(),
            broker_url: None,
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

fn prefix() -> String {
    format!("t-{}:", uuid::Uuid::new_v4().simple())
}

#[tokio::test]
async fn stores_celery_bytes_with_expiry_and_publish() {
    let p = prefix();
    let b = backend(&p, Some(Duration::from_secs(86400))).await;
    let client = redis::Client::open(url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut sub = client.get_async_pubsub().await.unwrap();
    let key = format!("{p}celery-task-meta-t1");
    sub.subscribe(&key).await.unwrap();
    let mut m = ResultMeta::new("t1", State::Success, json!(5));
    m.date_done = Some("2026-11-21T04:17:15.930178+00:00".into());
    assert_eq!(b.store(&[m]).await.unwrap(), 1);
    let want = r#"{"status": "SUCCESS", "result": 5, "traceback": null, "children": [], "date_done": "2026-11-21T04:17:15.930178+00:00", "task_id": "t1"}"#;
    let stored: String = conn.get(&key).await.unwrap();
    assert_eq!(stored, want);
    let ttl: i64 = conn.ttl(&key).await.unwrap();
    assert!((86390..=86400).contains(&ttl), "ttl {ttl}");
    let msg = tokio::time::timeout(Duration::from_secs(2), sub.on_message().next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(msg.get_payload::<String>().unwrap(), want);
    let _: () = conn.del(&key).await.unwrap();
}

#[tokio::test]
async fn success_is_never_overwritten() {
    let p = prefix();
    let b = backend(&p, None).await;
    let ok = ResultMeta::new("t2", State::Success, json!(1));
    let fail = ResultMeta::failure(
        "t2",
        &ExceptionInfo::new("builtins", "ValueError", "late duplicate"),
        None,
    );
    assert_eq!(b.store(&[ok]).await.unwrap(), 1);
    assert_eq!(b.store(&[fail]).await.unwrap(), 0);
    assert_eq!(
        b.get("t2").await.unwrap().unwrap()["status"],
        json!("SUCCESS")
    );
    // Non-final states can be replaced.
    let retry = ResultMeta::new("t3", State::Retry, json!(null));
    assert_eq!(
        b.store(&[
            retry,
            ResultMeta::failure("t3", &ExceptionInfo::new("builtins", "KeyError", "k"), None)
        ])
        .await
        .unwrap(),
        2
    );
    assert_eq!(
        b.get("t3").await.unwrap().unwrap()["status"],
        json!("FAILURE")
    );
    let mut conn = redis::Client::open(url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let ttl: i64 = conn.ttl(format!("{p}celery-task-meta-t3")).await.unwrap();
    assert_eq!(ttl, -1, "result_expires = None keeps results");
    let _: () = conn
        .del(&[
            format!("{p}celery-task-meta-t2"),
            format!("{p}celery-task-meta-t3"),
        ])
        .await
        .unwrap();
}

#[tokio::test]
async fn wait_returns_when_ready() {
    let p = prefix();
    let b = std::sync::Arc::new(backend(&p, Some(Duration::from_secs(60))).await);
    let writer = std::sync::Arc::clone(&b);
    let w = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        writer
            .store(&[ResultMeta::new(
                "t4",
                State::Custom("PROGRESS".into()),
                json!({"done": 1}),
            )])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        writer
            .store(&[ResultMeta::new("t4", State::Success, json!("done"))])
            .await
            .unwrap();
    });
    let got = b.wait("t4", Duration::from_secs(5)).await.unwrap().unwrap();
    w.await.unwrap();
    assert_eq!(got["result"], json!("done"));
    assert_eq!(
        b.wait("nope", Duration::from_millis(100)).await.unwrap(),
        None
    );
}

/// Regression (issue 20): Celery's client subscribes without waiting for Redis's confirmation and then GETs
/// on another connection, so Redis can run the GET first; a chain step stored between the two was never
/// seen and `get()` timed out. A final state of a task with a parent, stored while nobody listened, is
/// announced again: a subscriber that arrives just after the store still receives it.
#[tokio::test]
async fn a_result_stored_before_its_late_subscriber_is_announced_again() {
    let p = prefix();
    let b = backend(&p, None).await;
    let client = redis::Client::open(url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut step = ResultMeta::new("step", State::Success, json!(9));
    step.parent_id = Some("first".into());
    let root = ResultMeta::new("root", State::Success, json!(4));
    let mut progress = ResultMeta::new("progress", State::Started, json!({}));
    progress.parent_id = Some("first".into());
    assert_eq!(b.store(&[step, root, progress]).await.unwrap(), 3);
    // The client's SUBSCRIBE lands after the store (its GET ran before it and saw nothing).
    let mut sub = client.get_async_pubsub().await.unwrap();
    for id in ["step", "root", "progress"] {
        sub.subscribe(format!("{p}celery-task-meta-{id}"))
            .await
            .unwrap();
    }
    let mut messages = sub.on_message();
    let msg = tokio::time::timeout(Duration::from_secs(2), messages.next())
        .await
        .expect("the step's result was announced again")
        .unwrap();
    assert_eq!(msg.get_channel_name(), format!("{p}celery-task-meta-step"));
    let meta: serde_json::Value =
        serde_json::from_slice(&msg.get_payload::<Vec<u8>>().unwrap()).unwrap();
    assert_eq!(
        (meta["status"].clone(), meta["result"].clone()),
        (json!("SUCCESS"), json!(9))
    );
    // Only final states of tasks with a parent: a client-published task (subscribed at send) and a
    // non-final state are not announced again.
    assert!(
        tokio::time::timeout(Duration::from_millis(600), messages.next())
            .await
            .is_err()
    );
    drop(messages);
    // A result whose PUBLISH reached a subscriber is not announced again either.
    let mut twice = ResultMeta::new("heard", State::Success, json!(1));
    twice.parent_id = Some("first".into());
    let mut listener = client.get_async_pubsub().await.unwrap();
    listener
        .subscribe(format!("{p}celery-task-meta-heard"))
        .await
        .unwrap();
    b.store(&[twice]).await.unwrap();
    let mut heard = listener.on_message();
    assert!(
        tokio::time::timeout(Duration::from_secs(2), heard.next())
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(600), heard.next())
            .await
            .is_err()
    );
    let keys: Vec<String> = conn.keys(format!("{p}*")).await.unwrap();
    let _: () = conn.del(keys).await.unwrap();
}
