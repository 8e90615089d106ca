//! The worker loop: consume → prefetch → execute → store → ack.
//!
//! Four owned tasks cooperate:
//! - the **fetcher** takes messages in batches as prefetch slots free up (never more unacked messages than
//!   `concurrency × prefetch_multiplier`), dead-letters undecodable ones, answers unknown task names with a
//!   `NotRegistered` FAILURE, and holds ETA tasks in timers;
//! - the **dispatcher** starts at most `concurrency` tasks at once (acking first unless acks_late) and, on
//!   warm shutdown, gives back every message that never started;
//! - the **committer** batches result stores and acks into pipelines, in the order Celery writes them:
//!   early acks, then results, then late acks (a late ack never precedes its result);
//! - **housekeeping** renews the visibility lease of held messages, restores expired ones of dead
//!   consumers, polls queue lengths and serves `/metrics` and `/health`.
//!
//! # Layout
//! `settings` holds [`WorkerSettings`]; this file the shared state (`Shared`, `Slots`, `Job`, what the
//! committer receives) and `run`, which starts the stages and drains them on shutdown. One module per stage:
//! `fetch`, `dispatch`, `execute` (the `layers` chain, with `retry` and `ratelimit`), `commit`,
//! `housekeeping`, plus `canvas_flow` (callbacks, chain steps, chords) and `pidbox` (remote control).

use crate::error::WorkerError;
use crate::metrics::{Health, Metrics, QueueLabels};
use crate::telemetry::{Revocation, TaskTelemetry};
use celeriac_backend::ResultBackend;
use celeriac_broker::prelude::*;
use celeriac_broker::{Delivery, Held};
use celeriac_canvas::Canvas;
use celeriac_protocol::envelope::Envelope;
use celeriac_protocol::event::EventKind;
use celeriac_protocol::result::{ExceptionInfo, ResultMeta, State};
use celeriac_protocol::{TaskMessage, time};
use celeriac_task::{
    Handler, RateLimit, RegisteredTask, Registry, TaskContext, TaskError, backoff, random_unit,
};
use futures::FutureExt;
use serde_json::{Map, Value, json};
use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

mod canvas_flow;
mod commit;
mod dispatch;
mod execute;
mod fetch;
mod housekeeping;
mod layers;
mod pidbox;
mod ratelimit;
mod retry;
mod settings;
#[cfg(test)]
mod tests;

use commit::*;
use dispatch::*;
use execute::*;
use fetch::*;
use housekeeping::*;
use layers::Layer;
use ratelimit::*;
use retry::*;
pub use settings::WorkerSettings;

/// The two shutdown signals: warm (finish running tasks, give back the rest) and cold (stop now; unacked
/// messages are restored by the visibility timeout).
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    /// First SIGTERM/SIGINT.
    pub warm: CancellationToken,
    /// Second signal.
    pub cold: CancellationToken,
}

/// A message ready to run.
struct Job {
    held: Held,
    message: TaskMessage,
    task: Arc<RegisteredTask>,
    acks_late: bool,
    /// Whether this job still occupies a prefetch slot (ETA jobs give theirs back while they wait).
    holds_slot: bool,
}

enum Commit {
    /// A finished task: maybe a result to store, and how its message is settled around it.
    Done {
        meta: Option<Box<ResultMeta>>,
        ack: Ack,
    },
}

/// How a message is settled around the result stored with it.
enum Ack {
    /// Nothing to settle here (a state update, or a message settled elsewhere).
    None,
    /// Acked before the task ran (the default): that ack is applied before the result is stored, as in
    /// Celery, so a crash in between never runs a finished task again.
    Early(String),
    /// `acks_late`: acked after the result is stored (with whether it frees a prefetch slot).
    Late(String, bool),
}

impl Ack {
    fn of(job: &Job) -> Ack {
        if job.acks_late {
            Ack::Late(job.held.tag.clone(), job.holds_slot)
        } else {
            Ack::Early(job.held.tag.clone())
        }
    }
}

/// What is needed to settle an acks_late job the worker loses (abandoned at the shutdown timeout).
struct LateJob {
    held: Held,
    meta: ResultMeta,
    holds_slot: bool,
    reject_on_worker_lost: bool,
}

/// The prefetch bound and the set of messages this worker holds unacked.
struct Slots {
    prefetch: Arc<Semaphore>,
    /// Tags held unacked by this worker (their leases are renewed).
    held: Mutex<HashSet<String>>,
    metrics: Arc<Metrics>,
    /// Early acks not yet applied, with whether each frees a prefetch slot. The fetcher applies them in its
    /// next fetch script (one round trip for both); the ack flusher applies them if the fetcher does not
    /// pick them up within a couple of milliseconds (it is idle in BRPOP, for instance).
    pending_acks: Mutex<Vec<(String, bool)>>,
    wake_fetcher: tokio::sync::Notify,
    wake_flusher: tokio::sync::Notify,
    /// Fired whenever held messages are acked or released (the committer waits on early acks).
    acked: tokio::sync::Notify,
}

impl Slots {
    /// Queues an early ack.
    fn queue_ack(&self, tag: String, slot: bool) {
        self.pending_acks
            .lock()
            .expect("pending_acks")
            .push((tag, slot));
        self.wake_fetcher.notify_one();
        self.wake_flusher.notify_one();
    }

    fn take_acks(&self) -> Vec<(String, bool)> {
        std::mem::take(&mut *self.pending_acks.lock().expect("pending_acks"))
    }

    /// Forgets an acknowledged message without returning its prefetch slot (the caller accounts for it).
    fn forget(&self, tag: &str) {
        self.held.lock().expect("held").remove(tag);
        self.metrics.prefetched.dec();
        self.acked.notify_waiters();
    }

    /// Whether any of these messages is still held unacked.
    fn holds_any(&self, tags: &[String]) -> bool {
        let held = self.held.lock().expect("held");
        tags.iter().any(|t| held.contains(t))
    }

    fn hold(&self, tag: &str) {
        self.held.lock().expect("held").insert(tag.to_string());
        self.metrics.prefetched.inc();
    }

    /// A message is no longer ours: stop renewing it and free its prefetch slot.
    fn release(&self, tag: &str, slot: bool) {
        self.held.lock().expect("held").remove(tag);
        if slot {
            self.prefetch.add_permits(1);
        }
        self.metrics.prefetched.dec();
        self.acked.notify_waiters();
    }
}

struct Shared {
    settings: WorkerSettings,
    registry: Registry,
    broker: Arc<dyn Broker>,
    backend: Arc<dyn ResultBackend>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    slots: Arc<Slots>,
    /// acks_late jobs running now, for when a shutdown abandons them.
    running_late: Mutex<HashMap<String, LateJob>>,
    commit: mpsc::UnboundedSender<Commit>,
    /// Rate limiters by task name.
    limiters: HashMap<String, Arc<Limiter>>,
    /// Publishes callbacks, chain steps, chord bodies and errbacks.
    canvas: Canvas,
    /// What every task's context gets as `ctx.apply` and `ctx.limiter` (made once, shared).
    task_canvas: Arc<dyn celeriac_task::CanvasPublisher>,
    task_limiter: Arc<dyn celeriac_task::SharedLimiter>,
    /// Celery events.
    events: Arc<crate::events::Events>,
    /// Tasks running now (for `inspect active`).
    running: Mutex<HashMap<String, pidbox::Running>>,
    /// Tasks received and not started: waiting for a slot (`inspect reserved`) or for their ETA
    /// (`inspect scheduled`, with the ETA).
    waiting: Mutex<HashMap<String, pidbox::Waiting>>,
    /// Revoked task ids (persisted in the broker; loaded at start, extended by `revoke` broadcasts).
    revoked: std::sync::RwLock<HashSet<String>>,
    /// Queues consumed now (`add_consumer` / `cancel_consumer` change them).
    queues: std::sync::RwLock<Vec<String>>,
    /// The fetcher is inside a fetch (which may have read the queue list before a change).
    in_fetch: std::sync::atomic::AtomicBool,
    /// Fetches finished (deliveries handed on or given back); `cancel_consumer` waits for the next one.
    fetched: tokio::sync::watch::Sender<u64>,
    /// Concurrency slots (`pool_grow` / `pool_shrink` change them) and their current number.
    concurrency: Arc<Semaphore>,
    concurrency_now: std::sync::atomic::AtomicUsize,
    /// Time limits set at runtime (`time_limit`): task → (hard, soft).
    time_limits: std::sync::RwLock<HashMap<String, TimeLimits>>,
    /// Rate limits set at runtime (`rate_limit`) replace these.
    dyn_limiters: std::sync::RwLock<HashMap<String, Option<Arc<Limiter>>>>,
    /// The worker's own shutdown (the `shutdown` command).
    warm: CancellationToken,
}

/// `(hard, soft)` seconds.
type TimeLimits = (Option<f64>, Option<f64>);

impl Shared {
    /// Counts, announces and logs what happened to task `name` from `queue` (see [`TaskTelemetry`]).
    fn emit(&self, what: TaskTelemetry<'_>, name: &str, queue: &str) {
        what.emit(&self.metrics, &self.events, name, queue);
    }

    /// Records a received job as waiting (for a slot, or for `eta`) until it starts or leaves.
    fn wait_for(&self, job: &Job, eta: Option<String>) {
        let info = pidbox::RequestInfo::of(job, None, false, None);
        self.waiting
            .lock()
            .expect("waiting")
            .insert(job.message.id().to_string(), pidbox::Waiting { info, eta });
    }

    /// The job started or left the worker.
    fn unwait(&self, id: &str) {
        self.waiting.lock().expect("waiting").remove(id);
    }

    /// REVOKED with `TaskRevokedError(reason)` and `children: null`, as Celery stores a revoked task
    /// (`None` when results are ignored).
    fn revoked_meta(&self, job: &Job, reason: &str) -> Option<Box<ResultMeta>> {
        self.store_results(job).then(|| {
            let exc = ExceptionInfo::new("celery.exceptions", "TaskRevokedError", reason);
            let mut m = self.meta(job, State::Revoked, json!(exc), None);
            m.children = None;
            Box::new(m)
        })
    }

    fn current_queues(&self) -> Vec<String> {
        self.queues.read().expect("queues").clone()
    }

    /// The task's rate limiter: one set at runtime (`rate_limit`) wins over the configured one.
    fn limiter(&self, task: &str) -> Option<Arc<Limiter>> {
        if let Some(l) = self.dyn_limiters.read().expect("limiters").get(task) {
            return l.clone();
        }
        self.limiters.get(task).cloned()
    }

    fn is_revoked(&self, id: &str) -> bool {
        let set = self.revoked.read().expect("revoked");
        !set.is_empty() && set.contains(id)
    }

    fn release(&self, tag: &str, slot: bool) {
        self.slots.release(tag, slot);
    }

    fn store_results(&self, job: &Job) -> bool {
        !(self.settings.ignore_result
            || job.message.headers.ignore_result.unwrap_or(false)
            || job.task.options.ignore_result.unwrap_or(false))
    }

    fn meta(
        &self,
        job: &Job,
        status: State,
        result: Value,
        args: Option<(Vec<Value>, Map<String, Value>)>,
    ) -> ResultMeta {
        let h = &job.message.headers;
        let mut m = ResultMeta::new(h.id.clone(), status, result);
        if m.status.is_ready() {
            m.date_done = Some(time::isoformat(chrono::Utc::now()));
        }
        m.group_id = h.group.clone();
        m.parent_id = h.parent_id.clone();
        m.reply_to = job.message.properties.reply_to.clone();
        if let Some((args, kwargs)) = args {
            let mut ext = Map::new();
            ext.insert("name".into(), h.task.clone().into());
            ext.insert("args".into(), Value::Array(args));
            ext.insert("kwargs".into(), Value::Object(kwargs));
            ext.insert("worker".into(), self.settings.hostname.clone().into());
            ext.insert("retries".into(), h.retries.into());
            ext.insert("queue".into(), job.held.routing_key.clone().into());
            m.extended = Some(ext);
        }
        m
    }
}

/// Runs a worker until `shutdown`. Returns after a warm shutdown completed, or at once on a cold one.
pub async fn run(
    settings: WorkerSettings,
    registry: Registry,
    broker: Arc<dyn Broker>,
    backend: Arc<dyn ResultBackend>,
    shutdown: Shutdown,
) -> Result<(), WorkerError> {
    run_with_metrics(
        settings,
        registry,
        prometheus_client::registry::Registry::default(),
        broker,
        backend,
        shutdown,
    )
    .await
}

/// [`run`], serving `metrics` (the task families' series) on `/metrics` beside the worker's own.
pub async fn run_with_metrics(
    settings: WorkerSettings,
    registry: Registry,
    metrics: prometheus_client::registry::Registry,
    broker: Arc<dyn Broker>,
    backend: Arc<dyn ResultBackend>,
    shutdown: Shutdown,
) -> Result<(), WorkerError> {
    let metrics = Arc::new(Metrics::with_registry(&settings.hostname, metrics));
    let health = Arc::new(Health::with_peers(
        Duration::from_secs(10),
        Arc::clone(&settings.peers),
    ));
    metrics.prefetch_limit.set(settings.prefetch() as i64);

    broker.declare(&settings.queues).await?;
    broker.ping().await?;
    health.contact();
    broker.restore_visible().await?;

    let (commit_tx, commit_rx) = mpsc::unbounded_channel();
    let origin = format!(
        "gen{}@{}",
        crate::pid(),
        settings
            .hostname
            .split('@')
            .nth(1)
            .unwrap_or(&settings.hostname)
    );
    let canvas = Canvas::new(
        Arc::clone(&broker),
        Arc::clone(&backend),
        settings.default_queue.clone(),
        settings.routes.clone(),
        origin,
    )
    .with_sent_events(settings.send_sent_event);
    let registry = crate::builtins::with_builtins(registry);
    // The tasks routed to this worker's queues start their series at 0, so each one's first event is an
    // increase() Prometheus sees (celery-exporter's rate panels, the mixin's fail-rate alert).
    for name in registry.names() {
        let queue = settings
            .routes
            .get(&name)
            .map_or(settings.default_queue.as_str(), String::as_str);
        if settings.queues.iter().any(|q| q == queue) {
            metrics.init_task(&name, queue);
        }
    }
    let revoked: HashSet<String> = broker.revoked().await?.into_iter().collect();
    let settings_queues = settings.queues.clone();
    let settings_concurrency = settings.concurrency;
    let (events, events_rx) =
        crate::events::Events::new(&settings.hostname, settings.send_task_events);
    let events_stop = CancellationToken::new();
    let events_task = settings.heartbeat.then(|| {
        events.worker(
            EventKind::WorkerOnline,
            crate::events::HEARTBEAT.as_secs_f64(),
        );
        tokio::spawn(crate::events::publisher(
            Arc::clone(&events),
            events_rx,
            Arc::clone(&broker),
            events_stop.clone(),
        ))
    });
    let limiters: HashMap<String, Arc<Limiter>> = registry
        .tasks()
        .filter_map(|t| {
            t.options
                .rate_limit
                .map(|r| (t.name.clone(), Arc::new(Limiter::new(&t.name, r))))
        })
        .collect();
    let slots = Arc::new(Slots {
        prefetch: Arc::new(Semaphore::new(settings.prefetch())),
        held: Mutex::new(HashSet::new()),
        metrics: Arc::clone(&metrics),
        pending_acks: Mutex::new(Vec::new()),
        wake_fetcher: tokio::sync::Notify::new(),
        wake_flusher: tokio::sync::Notify::new(),
        acked: tokio::sync::Notify::new(),
    });
    let flusher_stop = CancellationToken::new();
    let flusher = tokio::spawn(ack_flusher(
        Arc::clone(&slots),
        Arc::clone(&broker),
        flusher_stop.clone(),
    ));
    let committer = tokio::spawn(committer(
        Arc::clone(&slots),
        Arc::clone(&broker),
        Arc::clone(&backend),
        commit_rx,
        Arc::clone(&settings.peers),
    ));
    let task_canvas: Arc<dyn celeriac_task::CanvasPublisher> =
        Arc::new(canvas_flow::Publisher(canvas.clone()));
    let task_limiter: Arc<dyn celeriac_task::SharedLimiter> =
        Arc::new(canvas_flow::BrokerLimiter(Arc::clone(&broker)));
    let shared = Arc::new(Shared {
        slots,
        settings,
        registry,
        broker,
        backend: Arc::clone(&backend),
        metrics: Arc::clone(&metrics),
        health: Arc::clone(&health),
        running_late: Mutex::new(HashMap::new()),
        commit: commit_tx,
        limiters,
        task_canvas,
        task_limiter,
        canvas,
        events: Arc::clone(&events),
        running: Mutex::new(HashMap::new()),
        waiting: Mutex::new(HashMap::new()),
        revoked: std::sync::RwLock::new(revoked),
        queues: std::sync::RwLock::new(settings_queues),
        in_fetch: std::sync::atomic::AtomicBool::new(false),
        fetched: tokio::sync::watch::Sender::new(0),
        concurrency: Arc::new(Semaphore::new(settings_concurrency)),
        concurrency_now: std::sync::atomic::AtomicUsize::new(settings_concurrency),
        time_limits: Default::default(),
        dyn_limiters: Default::default(),
        warm: shutdown.warm.clone(),
    });

    let housekeeping_stop = CancellationToken::new();
    let mut background = JoinSet::new();
    if let Some(addr) = shared.settings.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| WorkerError::Metrics {
                addr: addr.to_string(),
                source,
            })?;
        info!(%addr, "serving /metrics and /health");
        let app = crate::metrics::router(Arc::clone(&metrics), Arc::clone(&health));
        let stop = housekeeping_stop.clone();
        background.spawn(async move {
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
            {
                error!(error = %e, "metrics server failed");
            }
        });
    }
    background.spawn(housekeeping(Arc::clone(&shared), housekeeping_stop.clone()));
    background.spawn(health_probe(Arc::clone(&shared), housekeeping_stop.clone()));
    background.spawn(pidbox::serve(
        Arc::clone(&shared),
        housekeeping_stop.clone(),
    ));

    metrics.worker_up.set(1);
    info!(
        hostname = %shared.settings.hostname,
        queues = ?shared.settings.queues,
        concurrency = shared.settings.concurrency,
        prefetch = shared.settings.prefetch(),
        transport = shared.broker.transport(),
        tasks = ?shared.registry.names(),
        "celeriac worker ready"
    );

    let (ready_tx, ready_rx) = mpsc::unbounded_channel();
    let fetcher = tokio::spawn(fetcher(
        Arc::clone(&shared),
        ready_tx,
        shutdown.warm.clone(),
    ));
    let dispatcher = tokio::spawn(dispatcher(
        Arc::clone(&shared),
        ready_rx,
        shutdown.warm.clone(),
    ));
    if shared.settings.release_startup_pages {
        // Start-up ran code of every family the binary holds; what tasks run comes back as they run.
        background.spawn_blocking(|| match celeriac_os::release_executable_pages() {
            Ok(bytes) => debug!(bytes, "start-up code pages handed back to the kernel"),
            Err(e) => debug!(error = %e, "handing start-up code pages back failed"),
        });
    }

    let graceful = async {
        let _ = fetcher.await;
        let _ = dispatcher.await;
        flusher_stop.cancel();
        let _ = flusher.await;
        // Everything that could commit is gone except `shared`'s sender: close by dropping our handle.
        Ok::<_, WorkerError>(())
    };
    tokio::select! {
        r = graceful => r?,
        _ = shutdown.cold.cancelled() => {
            warn!("cold shutdown: stopping now; unacknowledged messages will be restored after the visibility timeout");
            return Ok(());
        }
    }
    // Let the committer flush what the finished tasks produced (its channel closes when the last sender,
    // inside `shared`, is dropped; housekeeping holds one too, so stop it first), then stop.
    housekeeping_stop.cancel();
    while background.join_next().await.is_some() {}
    drop(shared);
    tokio::select! {
        _ = committer => {}
        _ = shutdown.cold.cancelled() => return Ok(()),
    }
    metrics.worker_up.set(0);
    events_stop.cancel();
    if let Some(t) = events_task {
        let _ = t.await;
    }
    info!("warm shutdown complete");
    Ok(())
}
