//! Runtime tests over the in-memory broker and backend (the `test-utils` features): no server, so they
//! run in milliseconds and look straight at what the broker holds.

use celeriac_backend::ResultBackend;
use celeriac_backend::memory::MemoryBackend;
use celeriac_broker::memory::MemoryBroker;
use celeriac_broker::prelude::*;
use celeriac_protocol::{TaskMessage, Value};
use celeriac_worker::{Registry, Shutdown, TaskError, TaskOptions, WorkerSettings};
use serde_json::{Map, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

struct Env {
    broker: Arc<MemoryBroker>,
    backend: Arc<MemoryBackend>,
    shutdown: Shutdown,
    worker: tokio::task::JoinHandle<Result<(), celeriac_worker::WorkerError>>,
}

fn settings() -> WorkerSettings {
    WorkerSettings {
        hostname: "mem@host".into(),
        queues: vec!["q".into()],
        concurrency: 2,
        prefetch_multiplier: 2,
        acks_late: true,
        visibility_timeout: Duration::from_secs(60),
        shutdown_timeout: Duration::from_secs(10),
        default_queue: "q".into(),
        send_task_events: true,
        ..WorkerSettings::default()
    }
}

impl Env {
    fn start(registry: Registry) -> Self {
        let broker = Arc::new(MemoryBroker::default());
        let backend = Arc::new(MemoryBackend::new());
        let shutdown = Shutdown::default();
        let worker = tokio::spawn(celeriac_worker::run(
            settings(),
            registry,
            Arc::clone(&broker) as Arc<dyn Broker>,
            Arc::clone(&backend) as Arc<dyn ResultBackend>,
            shutdown.clone(),
        ));
        Self {
            broker,
            backend,
            shutdown,
            worker,
        }
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

    async fn stop(self) {
        self.shutdown.warm.cancel();
        self.worker.await.unwrap().unwrap();
    }
}

fn registry(runs: Arc<AtomicUsize>) -> Registry {
    let mut r = Registry::new();
    r.blocking_task(
        "t.add",
        &["x", "y"],
        TaskOptions::default(),
        |_ctx, (x, y): (i64, i64)| Ok(x + y),
    );
    r.task(
        "t.flaky",
        &["times"],
        TaskOptions::default(),
        move |ctx, (times,): (i64,)| {
            let runs = Arc::clone(&runs);
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                if ctx.retries < times {
                    return Err(TaskError::retry_in(0.05));
                }
                Ok(json!(ctx.retries))
            }
        },
    );
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_run_once_and_nothing_stays_unacked() {
    let env = Env::start(registry(Arc::default()));
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(env.send("t.add", vec![json!(i), json!(100)]).await);
    }
    for (i, id) in ids.iter().enumerate() {
        let meta = env.result(id).await;
        assert_eq!(meta["status"], "SUCCESS", "{meta}");
        assert_eq!(meta["result"], json!(i + 100));
    }
    let broker = Arc::clone(&env.broker);
    env.stop().await;
    assert!(broker.unacked().is_empty());
    assert_eq!(broker.queue_length("q").await.unwrap(), 0);
    let succeeded = broker
        .events()
        .iter()
        .filter(|(rk, _)| rk == "task.succeeded")
        .count();
    assert_eq!(succeeded, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_is_republished_whole_and_runs_to_its_result() {
    let runs = Arc::new(AtomicUsize::new(0));
    let env = Env::start(registry(Arc::clone(&runs)));
    let id = env.send("t.flaky", vec![json!(2)]).await;
    let meta = env.result(&id).await;
    assert_eq!(meta["status"], "SUCCESS", "{meta}");
    assert_eq!(meta["result"], json!(2));
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    let broker = Arc::clone(&env.broker);
    env.stop().await;
    assert!(broker.unacked().is_empty());
    let retried = broker
        .events()
        .iter()
        .filter(|(rk, _)| rk == "task.retried")
        .count();
    assert_eq!(retried, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_undecodable_messages_are_settled_with_a_reason() {
    let env = Env::start(registry(Arc::default()));
    let id = env.send("t.nope", vec![]).await;
    let meta = env.result(&id).await;
    assert_eq!(meta["status"], "FAILURE");
    assert_eq!(meta["result"]["exc_type"], "NotRegistered");
    env.broker.push_raw("q", b"{not json".to_vec());
    let ok = env.send("t.add", vec![json!(1), json!(2)]).await;
    assert_eq!(env.result(&ok).await["result"], json!(3));
    let broker = Arc::clone(&env.broker);
    for _ in 0..100 {
        if !broker.dead_letters("q").is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    env.stop().await;
    let dead = broker.dead_letters("q");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].1, b"{not json".to_vec());
    assert!(broker.unacked().is_empty());
}
