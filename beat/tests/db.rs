//! Beats with the schedule in PostgreSQL (own schema per test): migrations create the tables, the schedule is
//! read from them, a one-off runs once and is disabled, changes are picked up, and two beats coordinated by
//! the advisory lock send every slot of a simulated day once even when the leader's process dies.

use celeriac_beat::db::{DbStore, fingerprint, load};
use celeriac_beat::metrics::BeatMetrics;
use celeriac_beat::schedule::CatchUp;
use celeriac_beat::scheduler::Beat;
use celeriac_broker::{BrokerOptions, connect};
use celeriac_canvas::Canvas;
use celeriac_migrations::{Migrator, MigratorTraitReexport};
use chrono::{DateTime, Duration, Utc};
use redis::AsyncCommands;
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection};
use std::collections::HashMap;
use std::sync::Arc;

fn pg_url() -> String {
    std::env::var("CELERIAC_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn redis_url() -> String {
    std::env::var("CELERIAC_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

async fn db_in(schema: &str) -> DatabaseConnection {
    let mut opts = ConnectOptions::new(pg_url());
    opts.set_schema_search_path(schema).max_connections(4);
    Database::connect(opts).await.unwrap()
}

fn start() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-21T00:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

async fn beat(schema: &str, prefix: &str, name: &str) -> (Beat, DatabaseConnection) {
    let db = db_in(schema).await;
    let broker = connect(
        &redis_url(),
        BrokerOptions {
            global_keyprefix: prefix.into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let backend = celeriac_backend::connect(&redis_url(), Default::default())
        .await
        .unwrap();
    let canvas = Canvas::new(broker, backend, "dbq", Default::default(), "gen1@test");
    let (loaded, problems) = load(&db, CatchUp::Once).await.unwrap();
    assert!(problems.is_empty(), "{problems:?}");
    let b = Beat::new(
        name.into(),
        Arc::new(DbStore::new(db.clone(), schema)),
        canvas,
        loaded,
        std::time::Duration::from_secs(90),
        BeatMetrics::default(),
    );
    (b, db)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_schedule_over_a_day_with_a_leader_crash() {
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    let prefix = format!("t-{}:", uuid::Uuid::new_v4().simple());
    let admin = Database::connect(pg_url()).await.unwrap();
    admin
        .execute_unprepared(&format!("CREATE SCHEMA {schema}"))
        .await
        .unwrap();
    let db = db_in(&schema).await;
    Migrator::up(&db, None).await.unwrap();
    db.execute_unprepared(
        "INSERT INTO celeriac_interval_schedule (id, every, period) VALUES (1, 10, 'minutes');
         INSERT INTO celeriac_crontab_schedule (id, minute) VALUES (1, '*/15');
         INSERT INTO celeriac_clocked_schedule (id, clocked_time) VALUES (1, '2026-11-21T12:00:00Z');
         INSERT INTO celeriac_periodic_task (name, task, interval_id, args, priority) VALUES ('ten', 'bench.add', 1, '[1, 2]', 5);
         INSERT INTO celeriac_periodic_task (name, task, crontab_id) VALUES ('quarterly', 'bench.noop', 1);
         INSERT INTO celeriac_periodic_task (name, task, clocked_id, one_off) VALUES ('noon', 'bench.noop', 1, true);
         INSERT INTO celeriac_periodic_task (name, task, interval_id, enabled) VALUES ('paused', 'bench.noop', 1, false);",
    )
    .await
    .unwrap();

    let (a, _) = beat(&schema, &prefix, "a").await;
    let (b, db_b) = beat(&schema, &prefix, "b").await;
    let mut beats = vec![Some(a), Some(b)];
    let mut sent: HashMap<(String, DateTime<Utc>), usize> = HashMap::new();
    let mut seen = fingerprint(&db_b).await.unwrap();
    let mut crashed = false;
    for minute in 0..=1440 {
        let now = start() + Duration::minutes(minute);
        if minute == 300 {
            // A new entry appears while the beats run.
            db.execute_unprepared(
                "INSERT INTO celeriac_periodic_task (name, task, crontab_id) VALUES ('added', 'bench.noop', 1)",
            )
            .await
            .unwrap();
        }
        let current = fingerprint(&db_b).await.unwrap();
        if current != seen {
            let (loaded, _) = load(&db_b, CatchUp::Once).await.unwrap();
            for b in beats.iter_mut().flatten() {
                b.set_schedule(loaded.clone());
            }
            seen = current;
        }
        for slot in beats.iter_mut() {
            let Some(b) = slot else { continue };
            let tick = b.tick(now).await;
            for s in tick.sent {
                *sent.entry(s).or_default() += 1;
            }
            if minute == 600 && tick.leader && !crashed {
                // The leader's process dies: its connections (and the advisory lock) go with it.
                *slot = None;
                crashed = true;
            }
        }
    }
    assert!(crashed);
    assert!(sent.values().all(|n| *n == 1), "a slot was sent twice");
    let count = |e: &str| sent.keys().filter(|(n, _)| n == e).count();
    assert_eq!(
        (
            count("ten"),
            count("quarterly"),
            count("noon"),
            count("paused")
        ),
        (144, 96, 1, 0)
    );
    // 'added' starts counting when it was loaded (05:00): 05:15 .. 24:00.
    assert_eq!(count("added"), 76);
    let row = db
        .query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT total_run_count, enabled FROM celeriac_periodic_task WHERE name = 'noon'",
        ))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            row.try_get::<i64>("", "total_run_count").unwrap(),
            row.try_get::<bool>("", "enabled").unwrap()
        ),
        (1, false)
    );

    let mut conn = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys: Vec<String> = conn.keys(format!("{prefix}*")).await.unwrap();
    if !keys.is_empty() {
        let _: () = conn.del(keys).await.unwrap();
    }
    drop(beats);
    admin
        .execute_unprepared(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}
