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
