//! flower-compat: Flower's REST API (paths, parameters, status codes and JSON shapes of Flower 2.2) served by
//! celeriac, over any celeriac broker (Redis or RabbitMQ), with what Flower lacks: the task history is
//! persisted through sea-orm (SQLite by default, PostgreSQL by URL) with retention limits, `/api/workers`
//! status comes from live events, and `/metrics` adds queue lengths and worker concurrency and can drop the
//! per-worker label.
//!
//! # Layout
//! - [`state`]: cluster state from Celery events (Celery's `events.state` semantics).
//! - [`store`]: the persisted task history and Flower's task queries.
//! - [`search`]: Flower's task search language.
//! - [`api`]: the HTTP routes, authentication and read-only mode.
//! - [`metrics`]: Flower's Prometheus metrics.

pub mod api;
pub mod metrics;
pub mod search;
pub mod state;
pub mod store;

use celeriac_backend::ResultBackend;
use celeriac_broker::prelude::*;
use celeriac_canvas::Canvas;
use celeriac_protocol::envelope::Envelope;
use celeriac_protocol::event::EventKind;
use serde_json::{Map, Value};
use state::{ClusterState, TaskEvents, TaskRecord, events_in};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use store::TaskStore;
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Why flower-compat stopped.
#[derive(Debug, Error)]
pub enum FlowerError {
    /// The task database failed.
    #[error("task database: {0}")]
    Db(#[from] sea_orm::DbErr),
    /// The HTTP listener failed.
    #[error("http: {0}")]
    Io(#[from] std::io::Error),
    /// The broker failed.
    #[error("broker: {0}")]
    Broker(#[from] celeriac_broker::BrokerError),
}

/// How `celeriac flower` runs.
#[derive(Debug, Clone)]
pub struct FlowerSettings {
    /// Where to listen.
    pub address: SocketAddr,
    /// `user:password` pairs accepted by basic auth (none: the API needs `unauthenticated_api`).
    pub basic_auth: Vec<(String, String)>,
    /// Serve the API without authentication (Flower's `FLOWER_UNAUTHENTICATED_API`).
    pub unauthenticated_api: bool,
    /// Refuse every request that changes something (403).
    pub read_only: bool,
    /// Task database URL (`sqlite://flower.db?mode=rwc`, `postgres://...`).
    pub db_url: String,
    /// PostgreSQL schema.
    pub db_schema: Option<String>,
    /// Keep at most this many tasks.
    pub max_tasks: u64,
    /// Drop tasks whose last event is older than this.
    pub max_age: Option<Duration>,
    /// Label metrics by worker (Flower does; off avoids per-worker cardinality).
    pub metrics_worker_label: bool,
    /// How long `refresh` and control commands wait for replies.
    pub inspect_timeout: Duration,
    /// How often retention runs.
    pub prune_interval: Duration,
    /// Queues `/api/queues/length` reports while no worker told its own (`task_default_queue` and
    /// `task_queues`, as Flower falls back to).
    pub default_queues: Vec<String>,
}

/// Everything the routes share.
pub struct App {
    /// Settings.
    pub settings: FlowerSettings,
    /// The broker (events, remote control, queue lengths).
    pub broker: Arc<dyn Broker>,
    /// The result backend (`/api/task/result`).
    pub backend: Arc<dyn ResultBackend>,
    /// Publishes tasks (`/api/task/async-apply`, `send-task`, `apply`).
    pub canvas: Canvas,
    /// Task history.
    pub store: TaskStore,
    /// Live workers.
    pub cluster: Mutex<ClusterState>,
    /// Tasks changed since the last flush (and recently seen unfinished ones).
    pub cache: Mutex<HashMap<String, TaskRecord>>,
    dirty: Mutex<HashSet<String>>,
    /// Ids with a row in the database (loaded at start, grown by flushes, reloaded after retention): a task
    /// not in here is new, so its first event costs no database read.
    stored: Mutex<HashSet<String>>,
    /// One flush at a time: a reader that flushes first must also wait for a flush already writing.
    flushing: tokio::sync::Mutex<()>,
    /// The last inspect replies per worker (`/api/workers`): `{stats, registered, active_queues, ...}`.
    pub inspected: Mutex<Map<String, Value>>,
    /// Prometheus metrics.
    pub metrics: metrics::FlowerMetrics,
    /// Workers seen in events that were never inspected: the refresher asks them.
    discovered: tokio::sync::mpsc::UnboundedSender<String>,
    /// The receiver's Lamport clock (Celery's `EventReceiver.clock`).
    clock: std::sync::atomic::AtomicI64,
}

/// Celery's receiver localizes event times (`adjust_timestamp`): `timestamp - (utcoffset - here) × 3600`,
/// `utcoffset` being the sender's hours west of UTC and `here` this process's (Python's `time.timezone`
/// or `altzone`, floor-divided by 3600). Flower shows what that gives, so do we.
fn localize(event: &mut Map<String, Value>) {
    let (Some(ts), Some(offset)) = (
        event.get("timestamp").and_then(Value::as_f64),
        event.get("utcoffset").and_then(Value::as_f64),
    ) else {
        return;
    };
    let east = chrono::Local::now().offset().local_minus_utc();
    let here = (-east).div_euclid(3600);
    let adjusted = ts - (offset - f64::from(here)) * 3600.0;
    if adjusted != ts {
        event.insert("timestamp".into(), Value::from(adjusted));
    }
}

/// Unix time now.
pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

impl App {
    /// A task: the cached (freshest) copy, else the stored one.
    pub async fn task(&self, uuid: &str) -> Result<Option<TaskRecord>, sea_orm::DbErr> {
        let cached = self.cache.lock().expect("cache").get(uuid).cloned();
        match cached {
            Some(t) => Ok(Some(t)),
            None if self.stored.lock().expect("stored").contains(uuid) => {
                self.store.get(uuid).await
            }
            None => Ok(None),
        }
    }

    /// Applies one event from the broker.
    pub async fn ingest(&self, mut event: Map<String, Value>) {
        use std::sync::atomic::Ordering::Relaxed;
        // Celery's receiver: clients never sync clocks, so a task-sent event gets the receiver's clock - 1;
        // any other event advances the receiver's clock past its own.
        let known = event
            .get("type")
            .and_then(Value::as_str)
            .and_then(EventKind::parse);
        if known == Some(EventKind::TaskSent) {
            let c = self.clock.load(Relaxed);
            event.insert("clock".into(), Value::from(c.max(1) - 1));
            self.clock.fetch_add(1, Relaxed);
        } else {
            let theirs = event.get("clock").and_then(Value::as_i64).unwrap_or(0);
            let _ = self
                .clock
                .fetch_update(Relaxed, Relaxed, |c| Some(c.max(theirs) + 1));
        }
        localize(&mut event);
        let kind = event
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let received = now();
        if kind.starts_with("worker-") {
            self.cluster
                .lock()
                .expect("cluster")
                .worker_event(&event, received);
            if known != Some(EventKind::WorkerOffline)
                && let Some(host) = event.get("hostname").and_then(Value::as_str)
                && !self.inspected.lock().expect("inspected").contains_key(host)
            {
                let _ = self.discovered.send(host.to_string());
            }
            return;
        }
        if !kind.starts_with("task-") {
            return;
        }
        self.cluster
            .lock()
            .expect("cluster")
            .task_event_seen(&event);
        let Some(uuid) = event
            .get("uuid")
            .and_then(Value::as_str)
            .map(str::to_string)
        else {
            return;
        };
        let mut task = match self.task(&uuid).await {
            Ok(Some(t)) => t,
            Ok(None) => TaskRecord::new(&uuid),
            Err(e) => {
                warn!(error = %e, "reading the task history failed");
                TaskRecord::new(&uuid)
            }
        };
        let was_new = task.name.is_none() && task.received.is_none() && task.sent.is_none();
        task.apply(&event);
        self.metrics
            .observe(&event, &task, self.settings.metrics_worker_label);
        let parent = task.parent_id.clone().filter(|_| was_new);
        {
            let mut cache = self.cache.lock().expect("cache");
            cache.insert(uuid.clone(), task);
            self.dirty.lock().expect("dirty").insert(uuid.clone());
        }
        if let Some(parent) = parent
            && let Ok(Some(mut p)) = self.task(&parent).await
            && !p.children.contains(&uuid)
        {
            p.children.push(uuid);
            self.cache.lock().expect("cache").insert(parent.clone(), p);
            self.dirty.lock().expect("dirty").insert(parent);
        }
    }

    /// Writes changed tasks to the database; keeps unfinished ones cached.
    pub async fn flush(&self) -> Result<(), sea_orm::DbErr> {
        let _one = self.flushing.lock().await;
        let ids: Vec<String> = self.dirty.lock().expect("dirty").drain().collect();
        if ids.is_empty() {
            return Ok(());
        }
        let tasks: Vec<TaskRecord> = {
            let cache = self.cache.lock().expect("cache");
            ids.iter().filter_map(|id| cache.get(id).cloned()).collect()
        };
        if let Err(e) = self.store.save(&tasks).await {
            self.dirty.lock().expect("dirty").extend(ids);
            return Err(e);
        }
        self.stored.lock().expect("stored").extend(ids);
        let mut cache = self.cache.lock().expect("cache");
        let dirty = self.dirty.lock().expect("dirty");
        cache.retain(|id, t| {
            dirty.contains(id)
                || !matches!(
                    t.state.as_str(),
                    "SUCCESS" | "FAILURE" | "REVOKED" | "REJECTED"
                )
        });
        // Bound the cache of unfinished tasks too (their rows are in the database).
        if cache.len() > 50_000 {
            cache.retain(|id, _| dirty.contains(id));
        }
        Ok(())
    }

    /// Asks workers for `stats`, `registered`, `active_queues`, `conf`, `active`, `reserved`, `scheduled` and
    /// `revoked`, as Flower's `/api/workers?refresh=1` does, and caches the replies.
    pub async fn refresh_workers(&self, workername: Option<&str>) -> Result<(), FlowerError> {
        let destination = workername.map(|w| vec![w.to_string()]);
        let timeout = self.settings.inspect_timeout;
        // Flower asks every worker for these four, and one named worker for its task lists too.
        let all: [(&str, Value); 8] = [
            ("stats", Value::Object(Map::new())),
            ("active_queues", Value::Object(Map::new())),
            ("registered", serde_json::json!({"taskinfoitems": []})),
            ("conf", serde_json::json!({"with_defaults": false})),
            ("scheduled", Value::Object(Map::new())),
            ("active", serde_json::json!({"safe": null})),
            ("reserved", Value::Object(Map::new())),
            ("revoked", Value::Object(Map::new())),
        ];
        let methods = if workername.is_some() {
            &all[..]
        } else {
            &all[..4]
        };
        let calls = methods.iter().map(|(m, args)| {
            celeriac_broker::pidbox::call(
                self.broker.as_ref(),
                m,
                args.clone(),
                destination.as_deref(),
                timeout,
            )
        });
        let replies = futures::future::join_all(calls).await;
        let stamp = now();
        let mut inspected = self.inspected.lock().expect("inspected");
        for ((method, _), reply) in methods.iter().zip(replies) {
            for (node, value) in reply? {
                let entry = inspected
                    .entry(node)
                    .or_insert_with(|| Value::Object(Map::new()));
                if let Value::Object(e) = entry {
                    e.insert((*method).to_string(), value);
                    e.insert("timestamp".into(), serde_json::json!(stamp));
                }
            }
        }
        Ok(())
    }
}

/// Consumes events until `stop`, resubscribing after a broker loss.
async fn consume_events(app: Arc<App>, stop: CancellationToken) {
    use futures::StreamExt;
    let mut backoff = Duration::from_millis(200);
    loop {
        let mut stream = tokio::select! {
            s = app.broker.event_stream() => match s {
                Ok(s) => { backoff = Duration::from_millis(200); s }
                Err(e) => {
                    warn!(error = %e, retry_in = ?backoff, "subscribing to events failed");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        loop {
            let raw = tokio::select! {
                m = stream.next() => match m { Some(m) => m, None => break },
                _ = stop.cancelled() => return,
            };
            let Ok(env) = Envelope::parse(&raw) else {
                continue;
            };
            let Ok(body) = env.body_bytes() else { continue };
            let Ok(value) = serde_json::from_slice::<Value>(&body) else {
                continue;
            };
            for event in events_in(value) {
                app.ingest(event).await;
            }
        }
        warn!("event stream ended; subscribing again");
    }
}

/// Asks newly seen workers for their stats, queues and registered tasks (one at a time, each once until it
/// answered), until `stop`.
async fn refresher(
    app: Arc<App>,
    mut discovered: tokio::sync::mpsc::UnboundedReceiver<String>,
    stop: CancellationToken,
) {
    if let Err(e) = app.refresh_workers(None).await {
        warn!(error = %e, "asking workers for their state failed");
    }
    loop {
        let node = tokio::select! {
            n = discovered.recv() => match n { Some(n) => n, None => return },
            _ = stop.cancelled() => return,
        };
        if app.inspected.lock().expect("inspected").contains_key(&node) {
            continue;
        }
        if let Err(e) = app.refresh_workers(Some(&node)).await {
            warn!(error = %e, %node, "asking a new worker for its state failed");
        }
    }
}

/// Writes the task history every half second and applies retention every `prune_interval`, until `stop`.
async fn persist(app: Arc<App>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut last_prune = std::time::Instant::now();
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = stop.cancelled() => true,
        };
        if let Err(e) = app.flush().await {
            warn!(error = %e, "writing the task history failed; retrying");
        }
        if stopping {
            return;
        }
        if last_prune.elapsed() >= app.settings.prune_interval {
            last_prune = std::time::Instant::now();
            match app.store.prune(now()).await {
                Ok(0) => {}
                Ok(n) => {
                    info!(deleted = n, "task history retention");
                    match app.store.ids().await {
                        Ok(ids) => *app.stored.lock().expect("stored") = ids.into_iter().collect(),
                        Err(e) => warn!(error = %e, "reading the task history failed"),
                    }
                }
                Err(e) => warn!(error = %e, "task history retention failed"),
            }
        }
    }
}

/// Runs flower-compat until `shutdown`.
pub async fn run(
    settings: FlowerSettings,
    broker: Arc<dyn Broker>,
    backend: Arc<dyn ResultBackend>,
    canvas: Canvas,
    shutdown: CancellationToken,
) -> Result<(), FlowerError> {
    let store = TaskStore::open(
        &settings.db_url,
        settings.db_schema.as_deref(),
        settings.max_tasks,
        settings.max_age,
    )
    .await?;
    let store_ids = store.ids().await?.into_iter().collect();
    let listener = tokio::net::TcpListener::bind(settings.address).await?;
    let (discovered, discovered_rx) = tokio::sync::mpsc::unbounded_channel();
    let app = Arc::new(App {
        discovered,
        clock: std::sync::atomic::AtomicI64::new(0),
        metrics: metrics::FlowerMetrics::new(),
        settings,
        broker,
        backend,
        canvas,
        store,
        cluster: Mutex::new(ClusterState::default()),
        cache: Mutex::new(HashMap::new()),
        dirty: Mutex::new(HashSet::new()),
        flushing: tokio::sync::Mutex::new(()),
        inspected: Mutex::new(Map::new()),
        stored: Mutex::new(store_ids),
    });
    info!(address = %listener.local_addr()?, db = %celeriac_broker::url::redact(&app.settings.db_url), "celeriac flower listening");
    let stop = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(consume_events(Arc::clone(&app), stop.clone()));
    tasks.spawn(persist(Arc::clone(&app), stop.clone()));
    tasks.spawn(refresher(Arc::clone(&app), discovered_rx, stop.clone()));
    let router = api::router(Arc::clone(&app));
    let served = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await;
    stop.cancel();
    while tasks.join_next().await.is_some() {}
    served?;
    Ok(())
}
