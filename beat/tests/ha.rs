//! Several beats on one schedule over a simulated day (the clock is passed in, one tick per minute), against
//! the real Redis under a per-test key prefix: every slot is sent exactly once, also when the leader dies
//! and when a paused old leader wakes up.

use celeriac_beat::config::ScheduleFile;
use celeriac_beat::metrics::BeatMetrics;
use celeriac_beat::scheduler::Beat;
use celeriac_beat::store::Store;
use celeriac_broker::{BrokerOptions, connect};
use celeriac_canvas::Canvas;
use chrono::{DateTime, Duration, Utc};
use redis::AsyncCommands;
use std::collections::HashMap;

fn url() -> String {
    std::env::var("CELERIAC_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

const SCHEDULE: &str = r#"
[beat_schedule.quarterly]
task = "bench.noop"
crontab = { minute = "*/15" }
[beat_schedule.ten-minutes]
task = "bench.add"
schedule = 600
args = [1, 2]
options = { priority = 5, headers = { source = "beat" } }
"#;

async fn beats(prefix: &str, n: usize) -> Vec<Beat> {
    let broker = connect(
        &url(),
        BrokerOptions {
            global_keyprefix: prefix.into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let backend = celeriac_backend::connect(&url(), Default::default())
        .await
        .unwrap();
    let client = redis::Client::open(url()).unwrap();
    let mut out = Vec::new();
    for i in 0..n {
        let conn = redis::aio::ConnectionManager::new(client.clone())
            .await
            .unwrap();
        let canvas = Canvas::new(
            broker.clone(),
            backend.clone(),
            "beatq",
            Default::default(),
            "gen1@test",
        );
        out.push(Beat::new(
            format!("beat-{i}"),
            std::sync::Arc::new(Store::new(conn, prefix)),
            canvas,
            ScheduleFile::parse(SCHEDULE).unwrap(),
            std::time::Duration::from_secs(90),
            BeatMetrics::default(),
        ));
    }
    out
}

fn start() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-21T00:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_beats_send_every_slot_of_a_day_once_through_a_failover() {
    let prefix = format!("t-{}:", uuid::Uuid::new_v4().simple());
    let mut beats = beats(&prefix, 3).await;
    let mut sent: HashMap<(String, DateTime<Utc>), usize> = HashMap::new();
    let mut leaders_seen = Vec::new();
    let mut dead: Option<usize> = None;
    for minute in 0..=1440 {
        let now = start() + Duration::minutes(minute);
        for (i, beat) in beats.iter_mut().enumerate() {
            // The leader dies at minute 600 and wakes up (paused, not restarted) at minute 900.
            if dead == Some(i) && (600..900).contains(&minute) {
                continue;
            }
            let tick = beat.tick(now).await;
            if tick.leader && leaders_seen.last() != Some(&i) {
                leaders_seen.push(i);
            }
            if minute == 599 && tick.leader {
                dead = Some(i);
            }
            for s in tick.sent {
                *sent.entry(s).or_default() += 1;
            }
        }
    }
    let twice: Vec<_> = sent.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "sent more than once: {twice:?}");
    let quarterly = sent.keys().filter(|(e, _)| e == "quarterly").count();
    let ten = sent.keys().filter(|(e, _)| e == "ten-minutes").count();
    // Slots after the start: 00:15 .. 24:00 every 15 min, 00:10 .. 24:00 every 10 min.
    assert_eq!((quarterly, ten), (96, 144));
    assert!(
        leaders_seen.len() >= 2,
        "the leader changed after the failover: {leaders_seen:?}"
    );

    let mut conn = redis::Client::open(url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let queued: usize = conn.llen(format!("{prefix}beatq")).await.unwrap();
    let queued9: usize = conn.llen(format!("{prefix}beatq\x06\x163")).await.unwrap();
    assert_eq!(
        (queued, queued9),
        (96, 144),
        "priority 5 goes to the \\x06\\x163 list"
    );
    let raw: Vec<u8> = conn
        .lindex(format!("{prefix}beatq\x06\x163"), 0)
        .await
        .unwrap();
    let env: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(env["headers"]["celery_beat_task"], serde_json::json!(true));
    assert_eq!(env["headers"]["source"], serde_json::json!("beat"));
    assert_eq!(env["headers"]["argsrepr"], serde_json::json!("[1, 2]"));
    let keys: Vec<String> = conn.keys(format!("{prefix}*")).await.unwrap();
    let _: () = conn.del(keys).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_beat_neither_resends_nor_skips() {
    let prefix = format!("t-{}:", uuid::Uuid::new_v4().simple());
    let mut first = beats(&prefix, 1).await.remove(0);
    let mut sent = Vec::new();
    for minute in 0..=60 {
        sent.extend(first.tick(start() + Duration::minutes(minute)).await.sent);
    }
    first.resign().await;
    drop(first);
    // Down from 01:00 to 01:40; the new process sends the missed slots once (catch_up = once) and goes on.
    let mut second = beats(&prefix, 1).await.remove(0);
    for minute in 100..=120 {
        sent.extend(second.tick(start() + Duration::minutes(minute)).await.sent);
    }
    let slots = |e: &str| -> Vec<String> {
        sent.iter()
            .filter(|(n, _)| n == e)
            .map(|(_, s)| s.format("%H:%M").to_string())
            .collect()
    };
    assert_eq!(
        slots("quarterly"),
        [
            "00:15", "00:30", "00:45", "01:00", "01:30", "01:45", "02:00"
        ]
    );
    assert_eq!(
        slots("ten-minutes"),
        [
            "00:10", "00:20", "00:30", "00:40", "00:50", "01:00", "01:40", "01:50", "02:00"
        ]
    );
    let mut conn = redis::Client::open(url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys: Vec<String> = conn.keys(format!("{prefix}*")).await.unwrap();
    let _: () = conn.del(keys).await.unwrap();
}
