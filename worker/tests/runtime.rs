//! Integration tests of the worker runtime against the local Redis: an in-process worker with test tasks,
//! each test under its own key prefix and queue names.

use celeriac_backend::{BackendOptions, ResultBackend};
use celeriac_broker::BrokerOptions;
use celeriac_broker::prelude::*;
use celeriac_protocol::{TaskMessage, Value};
use celeriac_worker::{Registry, Shutdown, TaskError, TaskOptions, WorkerSettings};
use redis::AsyncCommands;
use serde_json::{Map, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

mod slow_acks;

fn url() -> String {
    std::env::var("CELERIAC_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

struct Env {
    prefix: String,
    broker: Arc<dyn Broker>,
    backend: Arc<dyn ResultBackend>,
    conn: redis::aio::MultiplexedConnection,
}

impl Env {
    async fn new() -> Self {
        let prefix = format!("t-{}:", uuid::Uuid::new_v4().simple());
        let broker = celeriac_broker::connect(
            &url(),
            BrokerOptions {
                global_keyprefix: prefix.clone(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let backend = celeriac_backend::connect(
            &url(),
            BackendOptions {
                global_keyprefix: prefix.clone(),
                ..Default::default()
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
            prefix,
            broker,
            backend,
            conn,
        }
    }

    fn settings(&self, concurrency: usize, multiplier: usize, acks_late: bool) -> WorkerSettings {
        WorkerSettings {
            hostname: "test@host".into(),
            queues: vec!["q".into()],
            concurrency,
            prefetch_multiplier: multiplier,
            acks_late,
            visibility_timeout: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(10),
            default_queue: "q".into(),
            send_task_events: true,
            ..WorkerSettings::default()
        }
    }

    /// Runs a worker in the background until `shutdown`.
    fn spawn(
        &self,
        settings: WorkerSettings,
        registry: Registry,
        shutdown: &Shutdown,
    ) -> tokio::task::JoinHandle<Result<(), celeriac_worker::WorkerError>> {
        self.spawn_over(Arc::clone(&self.broker), settings, registry, shutdown)
    }

    /// Runs a worker over another view of the test's broker.
    fn spawn_over(
        &self,
        broker: Arc<dyn Broker>,
        settings: WorkerSettings,
        registry: Registry,
        shutdown: &Shutdown,
    ) -> tokio::task::JoinHandle<Result<(), celeriac_worker::WorkerError>> {
        tokio::spawn(celeriac_worker::run(
            settings,
            registry,
            broker,
            Arc::clone(&self.backend),
            shutdown.clone(),
        ))
    }

    async fn send(&self, task: &str, args: Vec<Value>) -> String {
        let m = TaskMessage::new(task, uuid::Uuid::new_v4().to_string(), args, Map::new());
        self.broker.publish(&m, "q").await.unwrap();
        m.id().to_string()
    }

    async fn result(&self, id: &str) -> Value {
        self.backend
            .wait(id, Duration::from_secs(10))
            .await
            .unwrap()
            .unwrap_or(Value::Null)
    }

    async fn cleanup(mut self) {
        let keys: Vec<String> = self.conn.keys(format!("{}*", self.prefix)).await.unwrap();
        if !keys.is_empty() {
            let _: () = self.conn.del(keys).await.unwrap();
        }
    }
}

fn registry(running: Arc<AtomicUsize>, peak: Arc<AtomicUsize>) -> Registry {
    let mut r = Registry::new();
    r.task(
        "t.sleep",
        &["seconds"],
        TaskOptions::default(),
        move |_ctx, (s,): (f64,)| {
            let (running, peak) = (Arc::clone(&running), Arc::clone(&peak));
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs_f64(s)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                Ok(json!(s))
            }
        },
    );
    r.blocking_task(
        "t.blocking_double",
        &["x"],
        TaskOptions::default(),
        |_ctx, (x,): (i64,)| Ok(x * 2),
    );
    r.task(
        "t.fail",
        &[],
        TaskOptions::default(),
        |_ctx, _: Vec<Value>| async {
            Err::<Value, _>(TaskError::exception(
                Some("tasks"),
                "MyError",
                vec![json!("cust"), json!(42)],
            ))
        },
    );
    r.blocking_task(
        "t.blocking_panic",
        &[],
        TaskOptions::default(),
        |_ctx, _: Vec<Value>| -> Result<Value, TaskError> { panic!("blocking boom") },
    );
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_and_concurrency_are_bounds() {
    let env = Env::new().await;
    let (running, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut ids = Vec::new();
    for _ in 0..12 {
        ids.push(env.send("t.sleep", vec![json!(0.15)]).await);
    }
    let shutdown = Shutdown::default();
    let worker = env.spawn(
        env.settings(2, 2, true),
        registry(Arc::clone(&running), Arc::clone(&peak)),
        &shutdown,
    );
    let mut conn = env.conn.clone();
    let mut max_unacked = 0;
    for _ in 0..40 {
        let n: usize = conn.hlen(format!("{}unacked", env.prefix)).await.unwrap();
        max_unacked = max_unacked.max(n);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for id in &ids {
        assert_eq!(env.result(id).await["status"], json!("SUCCESS"));
    }
    shutdown.warm.cancel();
    worker.await.unwrap().unwrap();
    assert!(
        max_unacked <= 4,
        "prefetch 2×2 exceeded: {max_unacked} unacked"
    );
    assert!(
        max_unacked >= 3,
        "worker should prefetch up to its limit, saw {max_unacked}"
    );
    assert_eq!(peak.load(Ordering::SeqCst), 2, "concurrency 2");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_panics_and_blocking_tasks() {
    let env = Env::new().await;
    let ok = env.send("t.blocking_double", vec![json!(21)]).await;
    let fail = env.send("t.fail", vec![]).await;
    let panic = env.send("t.blocking_panic", vec![]).await;
    let after = env.send("t.blocking_double", vec![json!(5)]).await;
    let unknown = env.send("t.nope", vec![]).await;
    let shutdown = Shutdown::default();
    let worker = env.spawn(
        env.settings(2, 4, false),
        registry(Default::default(), Default::default()),
        &shutdown,
    );
    assert_eq!(env.result(&ok).await["result"], json!(42));
    let f = env.result(&fail).await;
    assert_eq!(f["status"], json!("FAILURE"));
    assert_eq!(
        f["result"],
        json!({"exc_type": "MyError", "exc_message": ["cust", 42], "exc_module": "tasks"})
    );
    let p = env.result(&panic).await;
    assert_eq!(
        p["result"],
        json!({"exc_type": "TaskPanicked", "exc_message": ["blocking boom"], "exc_module": "celeriac.exceptions"})
    );
    assert_eq!(
        env.result(&after).await["result"],
        json!(10),
        "the worker keeps running after a panic"
    );
    let u = env.result(&unknown).await;
    assert_eq!(
        u["result"],
        json!({"exc_type": "NotRegistered", "exc_message": ["t.nope"], "exc_module": "celery.exceptions"})
    );
    shutdown.warm.cancel();
    worker.await.unwrap().unwrap();
    let mut conn = env.conn.clone();
    let n: usize = conn.hlen(format!("{}unacked", env.prefix)).await.unwrap();
    assert_eq!(n, 0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_shutdown_gives_back_unstarted_and_finishes_running() {
    let env = Env::new().await;
    let (running, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(env.send("t.sleep", vec![json!(0.5)]).await);
    }
    let shutdown = Shutdown::default();
    let worker = env.spawn(
        env.settings(1, 4, false),
        registry(Arc::clone(&running), Arc::clone(&peak)),
        &shutdown,
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    shutdown.warm.cancel();
    worker.await.unwrap().unwrap();
    // The running task finished and stored its result; the prefetched ones are back in the queue.
    assert_eq!(
        env.backend.get(&ids[0]).await.unwrap().unwrap()["status"],
        json!("SUCCESS")
    );
    assert_eq!(env.broker.queue_length("q").await.unwrap(), 4);
    let mut conn = env.conn.clone();
    let n: usize = conn.hlen(format!("{}unacked", env.prefix)).await.unwrap();
    assert_eq!(n, 0);
    for id in &ids[1..] {
        assert!(env.backend.get(id).await.unwrap().is_none());
    }
    env.cleanup().await;
}

/// Issue 20: an early ack (Celery acks before the task runs) must have landed before the result is stored;
/// otherwise a worker crash between the two leaves a finished task's message to be restored and run again.
/// Acks here reach Redis 300 ms late; the moment each result is readable, its message must be gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_ack_lands_before_the_result_is_stored() {
    let env = Env::new().await;
    let (running, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let slow: Arc<dyn Broker> = Arc::new(slow_acks::SlowAcks {
        inner: Arc::clone(&env.broker),
        delay: Duration::from_millis(300),
    });
    let shutdown = Shutdown::default();
    let worker = env.spawn_over(
        slow,
        env.settings(2, 4, false),
        registry(Arc::clone(&running), Arc::clone(&peak)),
        &shutdown,
    );
    let mut conn = env.conn.clone();
    for x in 0..3 {
        let id = env.send("t.blocking_double", vec![json!(x)]).await;
        let key = format!("{}celery-task-meta-{id}", env.prefix);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let stored: String = loop {
            let got: Option<String> = conn.get(&key).await.unwrap();
            if let Some(v) = got {
                break v;
            }
            assert!(tokio::time::Instant::now() < deadline, "no result for {id}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        let unacked: usize = conn.hlen(format!("{}unacked", env.prefix)).await.unwrap();
        assert_eq!(
            unacked, 0,
            "result of task {x} stored before its ack landed"
        );
        let meta: Value = serde_json::from_str(&stored).unwrap();
        assert_eq!(meta["status"], json!("SUCCESS"));
        assert_eq!(meta["result"], json!(x * 2));
    }
    shutdown.warm.cancel();
    worker.await.unwrap().unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_extended_adds_request_fields() {
    let env = Env::new().await;
    let id = env.send("t.blocking_double", vec![json!(4)]).await;
    let shutdown = Shutdown::default();
    let mut settings = env.settings(1, 1, false);
    settings.result_extended = true;
    let worker = env.spawn(
        settings,
        registry(Default::default(), Default::default()),
        &shutdown,
    );
    let meta = env.result(&id).await;
    shutdown.warm.cancel();
    worker.await.unwrap().unwrap();
    let keys: Vec<&String> = meta.as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        [
            "status",
            "result",
            "traceback",
            "children",
            "date_done",
            "name",
            "args",
            "kwargs",
            "worker",
            "retries",
            "queue",
            "task_id"
        ]
    );
    assert_eq!(
        (
            &meta["name"],
            &meta["args"],
            &meta["kwargs"],
            &meta["worker"],
            &meta["retries"],
            &meta["queue"],
            &meta["result"]
        ),
        (
            &json!("t.blocking_double"),
            &json!([4]),
            &json!({}),
            &json!("test@host"),
            &json!(0),
            &json!("q"),
            &json!(8)
        )
    );
    env.cleanup().await;
}

/// A warm shutdown that times out loses its acks_late tasks; Celery's rule decides their fate.
async fn abandoned_at_shutdown(reject_on_worker_lost: bool) -> (Value, u64, usize) {
    let env = Env::new().await;
    let id = env.send("t.sleep", vec![json!(5.0)]).await;
    let shutdown = Shutdown::default();
    let mut settings = env.settings(1, 1, true);
    settings.reject_on_worker_lost = reject_on_worker_lost;
    settings.shutdown_timeout = Duration::from_millis(300);
    let worker = env.spawn(
        settings,
        registry(Default::default(), Default::default()),
        &shutdown,
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    shutdown.warm.cancel();
    worker.await.unwrap().unwrap();
    let meta = env.backend.get(&id).await.unwrap().unwrap_or(Value::Null);
    let waiting = env.broker.queue_length("q").await.unwrap();
    let mut conn = env.conn.clone();
    let unacked: usize = conn.hlen(format!("{}unacked", env.prefix)).await.unwrap();
    env.cleanup().await;
    (meta, waiting, unacked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_acks_late_task_fails_with_worker_lost_error() {
    let (meta, waiting, unacked) = abandoned_at_shutdown(false).await;
    assert_eq!(meta["status"], json!("FAILURE"));
    assert_eq!(meta["result"]["exc_type"], json!("WorkerLostError"));
    assert_eq!(meta["result"]["exc_module"], json!("billiard.exceptions"));
    assert_eq!((waiting, unacked), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_acks_late_task_is_requeued_with_reject_on_worker_lost() {
    let (meta, waiting, unacked) = abandoned_at_shutdown(true).await;
    assert_eq!(meta, Value::Null);
    assert_eq!((waiting, unacked), (1, 0));
}

fn outcomes_registry() -> Registry {
    let mut r = Registry::new();
    let late = TaskOptions {
        acks_late: Some(true),
        ..Default::default()
    };
    r.task(
        "t.reject_requeue",
        &[],
        late.clone(),
        |ctx, _: Vec<Value>| async move {
            // Requeued once, then accepted: the second delivery is flagged redelivered.
            if ctx.redelivered {
                Ok(json!("second delivery"))
            } else {
                Err(TaskError::Reject {
                    requeue: true,
                    reason: "not yet".into(),
                })
            }
        },
    );
    r.task("t.reject", &[], late, |_ctx, _: Vec<Value>| async move {
        Err::<Value, _>(TaskError::Reject {
            requeue: false,
            reason: "rejected-reason".into(),
        })
    });
    r.task(
        "t.ignore",
        &[],
        TaskOptions::default(),
        |_ctx, _: Vec<Value>| async move { Err::<Value, _>(TaskError::Ignore) },
    );
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_and_ignore_follow_celery() {
    let env = Env::new().await;
    let requeued = env.send("t.reject_requeue", vec![]).await;
    let rejected = env.send("t.reject", vec![]).await;
    let ignored = env.send("t.ignore", vec![]).await;
    let shutdown = Shutdown::default();
    let worker = env.spawn(env.settings(1, 1, false), outcomes_registry(), &shutdown);
    assert_eq!(
        env.result(&requeued).await["result"],
        json!("second delivery")
    );
    let r = env.result(&rejected).await;
    assert_eq!(r["status"], json!("FAILURE"));
    assert_eq!(
        r["result"],
        json!({"exc_type": "Reject", "exc_message": ["rejected-reason", false], "exc_module": "celery.exceptions"})
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    shutdown.warm.cancel();
    worker.await.unwrap().unwrap();
    assert!(
        env.backend.get(&ignored).await.unwrap().is_none(),
        "Ignore stores nothing"
    );
    let mut conn = env.conn.clone();
    let unacked: usize = conn.hlen(format!("{}unacked", env.prefix)).await.unwrap();
    assert_eq!(
        (env.broker.queue_length("q").await.unwrap(), unacked),
        (0, 0)
    );
    env.cleanup().await;
}
