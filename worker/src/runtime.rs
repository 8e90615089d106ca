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

use crate::error::WorkerError;
use crate::metrics::{Health, Metrics, QueueLabels, TaskEvent};
use celeriac_backend::ResultBackend;
use celeriac_broker::{Broker, Delivery, Held};
use celeriac_canvas::Canvas;
use celeriac_protocol::envelope::Envelope;
use celeriac_protocol::result::{ExceptionInfo, ResultMeta, State};
use celeriac_protocol::{TaskMessage, time};
use celeriac_task::{
    Handler, RateLimit, RegisteredTask, Registry, TaskContext, TaskError, backoff, random_unit,
};
use futures::FutureExt;
use serde_json::{Map, Value, json};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

/// Everything a worker needs to run, already validated.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Node name (`celery@host`).
    pub hostname: String,
    /// Queues in consume order (earlier ones served first).
    pub queues: Vec<String>,
    /// Tasks run at once.
    pub concurrency: usize,
    /// Prefetch = concurrency × this.
    pub prefetch_multiplier: usize,
    /// `task_acks_late`.
    pub acks_late: bool,
    /// `task_reject_on_worker_lost`.
    pub reject_on_worker_lost: bool,
    /// `task_ignore_result`.
    pub ignore_result: bool,
    /// `result_extended`.
    pub result_extended: bool,
    /// The broker's visibility timeout (leases are renewed well within it).
    pub visibility_timeout: Duration,
    /// How long a warm shutdown waits for running tasks.
    pub shutdown_timeout: Duration,
    /// Where `/metrics` and `/health` listen.
    pub metrics_addr: Option<SocketAddr>,
    /// `task_time_limit` (hard, seconds).
    pub time_limit: Option<f64>,
    /// `task_soft_time_limit` (seconds).
    pub soft_time_limit: Option<f64>,
    /// `task_track_started`.
    pub track_started: bool,
    /// `task_acks_on_failure_or_timeout` (on Redis a rejected message is removed like an acked one).
    pub acks_on_failure_or_timeout: bool,
    /// ETA tasks due later than this are parked in the broker instead of worker memory.
    pub eta_horizon: Duration,
    /// At most this many ETA tasks wait in memory; more are parked.
    pub eta_max_in_memory: usize,
    /// `task_default_queue`, for callbacks and chain steps without a queue of their own.
    pub default_queue: String,
    /// `task_routes`: task name → queue.
    pub routes: HashMap<String, String>,
    /// Send task events (`-E`, `worker_send_task_events`).
    pub send_task_events: bool,
    /// Publish `task-sent` events for tasks the worker publishes (retries, callbacks, chain steps).
    pub send_sent_event: bool,
    /// Send worker heartbeats and online/offline events.
    pub heartbeat: bool,
    /// The outside peers' health, shared with the task families (`/health` names those down).
    pub peers: Arc<celeriac_task::Peers>,
}

impl WorkerSettings {
    /// The prefetch limit.
    pub fn prefetch(&self) -> usize {
        self.concurrency * self.prefetch_multiplier
    }
}

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

/// A task's rate limiter: per worker (governor) or shared by every worker through the broker.
enum Limiter {
    Local(governor::DefaultDirectRateLimiter),
    Cluster {
        key: String,
        interval: Duration,
        /// Used when the broker has no shared limiter (RabbitMQ) or it fails: this worker limits alone.
        fallback: governor::DefaultDirectRateLimiter,
        warned: std::sync::atomic::AtomicBool,
    },
}

fn local_limiter(interval: Duration) -> governor::DefaultDirectRateLimiter {
    let quota = governor::Quota::with_period(interval.max(Duration::from_nanos(1)))
        .expect("non-zero period");
    governor::RateLimiter::direct(quota)
}

fn local_check(l: &governor::DefaultDirectRateLimiter) -> Option<Duration> {
    use governor::clock::Clock;
    l.check()
        .err()
        .map(|not_until| not_until.wait_time_from(governor::clock::DefaultClock::default().now()))
}

impl Limiter {
    fn new(name: &str, rate: RateLimit) -> Self {
        if rate.cluster {
            Self::Cluster {
                key: name.to_string(),
                interval: rate.interval,
                fallback: local_limiter(rate.interval),
                warned: std::sync::atomic::AtomicBool::new(false),
            }
        } else {
            Self::Local(local_limiter(rate.interval))
        }
    }

    /// `None`: run now; `Some(wait)`: not before `wait` from now.
    async fn check(&self, broker: &dyn Broker) -> Option<Duration> {
        match self {
            Self::Local(l) => local_check(l),
            Self::Cluster {
                key,
                interval,
                fallback,
                warned,
            } => match broker.take_shared_token(key, *interval, 1).await {
                Ok(wait) => wait,
                Err(e) => {
                    if !warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
                        warn!(error = %e, task = %key, "shared rate limiter unavailable; this worker limits on its own");
                    }
                    local_check(fallback)
                }
            },
        }
    }
}

impl Shared {
    /// Records a received job as waiting (for a slot, or for `eta`) until it starts or leaves.
    fn wait_for(&self, job: &Job, eta: Option<String>) {
        let info = pidbox::request_info(job, &self.settings.hostname, None, false, None);
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
        std::process::id(),
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
        events.worker("worker-online", crate::events::HEARTBEAT.as_secs_f64());
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

/// Takes messages while prefetch slots are free.
async fn fetcher(
    shared: Arc<Shared>,
    ready: mpsc::UnboundedSender<Box<Job>>,
    warm: CancellationToken,
) {
    let mut timers: JoinSet<(Box<Job>, bool)> = JoinSet::new();
    let mut backoff = Duration::from_millis(100);
    let mut down = false;
    loop {
        while let Some(Ok((job, _))) = timers.try_join_next() {
            eta_fired(&shared, job, &ready);
        }
        let first = tokio::select! {
            biased;
            _ = warm.cancelled() => break,
            Some(Ok((job, _))) = timers.join_next(), if !timers.is_empty() => {
                eta_fired(&shared, job, &ready);
                continue;
            }
            p = tokio::time::timeout(Duration::from_secs(2), Arc::clone(&shared.slots.prefetch).acquire_owned()) => Some(p),
            _ = shared.slots.wake_fetcher.notified() => None,
        };
        if first.is_none() {
            // Woken by an ack: let the tasks being started right now queue theirs too, so one fetch
            // carries a batch of acks rather than one.
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
        }
        let acks = shared.slots.take_acks();
        let mut slots = 0;
        match first {
            Some(Ok(Ok(permit))) => {
                permit.forget();
                slots = 1;
            }
            Some(_) if acks.is_empty() => {
                // All slots busy: still prove the broker connection is alive for /health.
                if shared.broker.ping().await.is_ok() {
                    shared.health.contact();
                } else {
                    shared.health.lost();
                }
                continue;
            }
            _ => {}
        }
        if acks.is_empty() && slots == 0 {
            continue;
        }
        let freed = acks.iter().filter(|(_, slot)| *slot).count();
        while slots < 1024 {
            match shared.slots.prefetch.try_acquire() {
                Ok(p) => {
                    p.forget();
                    slots += 1;
                }
                Err(_) => break,
            }
        }
        let ack_tags: Vec<String> = acks.iter().map(|(t, _)| t.clone()).collect();
        let max = slots + freed;
        // Never cancel a fetch half-way: a popped message must reach us to be acked or given back.
        shared
            .in_fetch
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let fetched = shared
            .broker
            .fetch(
                &shared.current_queues(),
                max,
                &ack_tags,
                Duration::from_secs(1),
            )
            .await;
        let _done = FetchDone(&shared);
        match fetched {
            Ok(deliveries) => {
                backoff = Duration::from_millis(100);
                if down {
                    info!("broker connection back; consuming again");
                    down = false;
                }
                shared.health.contact();
                for (tag, _) in &acks {
                    shared.slots.forget(tag);
                }
                shared.slots.prefetch.add_permits(max - deliveries.len());
                for d in deliveries {
                    receive(&shared, d, &ready, &mut timers, &warm).await;
                }
            }
            Err(e) => {
                shared.health.lost();
                shared.slots.prefetch.add_permits(slots);
                // Not known to be applied: hand the acks back (acking twice is harmless).
                shared
                    .slots
                    .pending_acks
                    .lock()
                    .expect("pending_acks")
                    .extend(acks);
                shared.slots.wake_flusher.notify_one();
                let reconnecting = matches!(e, celeriac_broker::BrokerError::NotConnected(_));
                if reconnecting {
                    // The transport reconnects on its own and answers at once meanwhile: poll briskly so
                    // consuming resumes as soon as the connection is back.
                    backoff = backoff.min(Duration::from_millis(200));
                    if !down {
                        warn!(error = %e, "broker connection down; waiting for it to come back");
                    }
                    down = true;
                } else {
                    error!(error = %e, retry_in = ?backoff, "fetching from the broker failed");
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = warm.cancelled() => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    // Warm shutdown: ETA tasks still waiting go back to their queues.
    let mut waiting = Vec::new();
    while let Some(r) = timers.join_next().await {
        if let Ok((job, fired)) = r {
            if fired {
                let _ = ready.send(job);
            } else {
                waiting.push(job);
            }
        }
    }
    give_back(&shared, waiting).await;
}

/// Marks the end of a fetch (after its deliveries were handed on or given back) when dropped.
struct FetchDone<'a>(&'a Shared);

impl Drop for FetchDone<'_> {
    fn drop(&mut self) {
        self.0
            .in_fetch
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self.0.fetched.send_modify(|n| *n += 1);
    }
}

async fn receive(
    shared: &Arc<Shared>,
    d: Delivery,
    ready: &mpsc::UnboundedSender<Box<Job>>,
    timers: &mut JoinSet<(Box<Job>, bool)>,
    warm: &CancellationToken,
) {
    let Delivery { held, message } = d;
    shared.slots.hold(&held.tag);
    if !shared.queues.read().expect("queues").contains(&held.queue) {
        // Popped by a fetch that started before `cancel_consumer`: not ours any more, back to the front.
        if let Err(e) = shared.broker.requeue(&[&held], true).await {
            warn!(error = %e, queue = %held.queue, "giving back a message of a cancelled queue failed");
        }
        shared.release(&held.tag, true);
        return;
    }
    let message = match message {
        Ok(m) => m,
        Err(e) => {
            let reason = e.to_string();
            warn!(queue = %held.queue, tag = %held.tag, %reason, "undecodable message dead-lettered (celeriac.deadletter.<queue>)");
            shared.metrics.dead_lettered.inc();
            if let Err(err) = shared.broker.dead_letter(&held, &reason).await {
                error!(error = %err, tag = %held.tag, "dead-lettering failed; the message stays unacked and will be restored");
            }
            shared.release(&held.tag, true);
            return;
        }
    };
    let name = message.task().to_string();
    shared.metrics.task(TaskEvent::Received, &name, &held.queue);
    let Some(task) = shared.registry.get(&name).cloned() else {
        error!(task = %name, id = %message.id(), "Received unregistered task of type {name:?}; storing NotRegistered");
        shared.metrics.failed(&name, &held.queue, "NotRegistered");
        let exc = ExceptionInfo::new("celery.exceptions", "NotRegistered", name.clone());
        shared.events.task(
            "task-failed",
            vec![
                ("uuid", json!(message.id())),
                ("exception", json!(exc.repr())),
                ("traceback", Value::Null),
            ],
        );
        let mut meta = ResultMeta::failure(message.id(), &exc, None);
        meta.date_done = Some(time::isoformat(chrono::Utc::now()));
        meta.group_id = message.headers.group.clone();
        meta.parent_id = message.headers.parent_id.clone();
        meta.reply_to = message.properties.reply_to.clone();
        let _ = shared.commit.send(Commit::Done {
            meta: Some(Box::new(meta)),
            ack: Ack::Late(held.tag, true),
        });
        return;
    };
    debug!(task = %name, id = %message.id(), "Task received");
    if shared.events.task_events() {
        let h = &message.headers;
        shared.events.task(
            "task-received",
            vec![
                ("uuid", json!(h.id)),
                ("name", json!(h.task)),
                ("args", json!(h.argsrepr)),
                ("kwargs", json!(h.kwargsrepr)),
                ("root_id", json!(h.root_id)),
                ("parent_id", json!(h.parent_id)),
                ("retries", json!(h.retries)),
                ("eta", json!(h.eta)),
                ("expires", json!(h.expires)),
            ],
        );
    }
    let acks_late = task.options.acks_late.unwrap_or(shared.settings.acks_late);
    let now = chrono::Utc::now();
    let expired = message
        .headers
        .expires
        .as_deref()
        .and_then(time::parse_iso)
        .is_some_and(|t| t <= now);
    let mut job = Box::new(Job {
        held,
        message,
        task,
        acks_late,
        holds_slot: true,
    });
    if expired {
        revoke_expired(shared, job);
        return;
    }
    if shared.is_revoked(job.message.id()) {
        discard_revoked(shared, job);
        return;
    }
    let eta = job
        .message
        .headers
        .eta
        .as_deref()
        .and_then(time::parse_iso)
        .filter(|t| *t > now);
    match eta {
        Some(eta) => {
            let wait = (eta - now).to_std().unwrap_or_default();
            // On AMQP a held message keeps its prefetch slot at the broker (per-consumer QoS), so anything
            // not due within a second waits in RabbitMQ's delay queues instead of blocking the consumer.
            if wait > shared.settings.eta_horizon
                || timers.len() >= shared.settings.eta_max_in_memory
                || (shared.broker.holds_cost_prefetch() && wait > Duration::from_secs(1))
            {
                // Far in the future (or too many waiting): park it in the broker, out of `unacked`, so no
                // visibility timeout redelivers it and memory stays flat; any worker republishes it when due.
                match shared.broker.park(&job.held, eta).await {
                    Ok(parked) => {
                        debug!(id = %job.message.id(), %eta, parked, "ETA task parked");
                        shared.release(&job.held.tag, true);
                        return;
                    }
                    Err(e) => warn!(error = %e, "parking an ETA task failed; holding it in memory"),
                }
            }
            // Held in a timer; like Celery, an ETA task does not count against prefetch while it waits.
            job.holds_slot = false;
            shared.slots.prefetch.add_permits(1);
            shared.wait_for(&job, job.message.headers.eta.clone());
            timers.spawn(hold(job, wait, warm.clone()));
        }
        None => {
            shared.wait_for(&job, None);
            let _ = ready.send(job);
        }
    }
}

/// Holds `item` for `wait`: `(item, true)` when the time came, `(item, false)` when a warm shutdown came
/// first (the caller gives it back to the broker). Used for ETA timers and rate-limited jobs.
async fn hold<T>(item: T, wait: Duration, warm: CancellationToken) -> (T, bool) {
    tokio::select! {
        _ = tokio::time::sleep(wait) => (item, true),
        _ = warm.cancelled() => (item, false),
    }
}

/// An ETA came due: run the task unless it expired meanwhile (Celery checks `expires` again here).
fn eta_fired(shared: &Shared, job: Box<Job>, ready: &mpsc::UnboundedSender<Box<Job>>) {
    let expired = job
        .message
        .headers
        .expires
        .as_deref()
        .and_then(time::parse_iso)
        .is_some_and(|t| t <= chrono::Utc::now());
    if expired {
        revoke_expired(shared, job);
    } else if shared.is_revoked(job.message.id()) {
        discard_revoked(shared, job);
    } else {
        shared.wait_for(&job, None);
        let _ = ready.send(job);
    }
}

/// A revoked task seen on receipt or when its ETA fires: REVOKED (not over a SUCCESS), acked, never run.
fn discard_revoked(shared: &Shared, job: Box<Job>) {
    shared.unwait(job.message.id());
    info!(task = %job.message.task(), id = %job.message.id(), "Discarding revoked task");
    shared
        .metrics
        .task(TaskEvent::Revoked, job.message.task(), &job.held.queue);
    shared.events.task(
        "task-revoked",
        vec![
            ("uuid", json!(job.message.id())),
            ("terminated", json!(false)),
            ("signum", Value::Null),
            ("expired", json!(false)),
        ],
    );
    let meta = shared.revoked_meta(&job, "revoked");
    let _ = shared.commit.send(Commit::Done {
        meta,
        ack: Ack::Late(job.held.tag, job.holds_slot),
    });
}

fn revoke_expired(shared: &Shared, job: Box<Job>) {
    shared.unwait(job.message.id());
    info!(task = %job.message.task(), id = %job.message.id(), "Discarding expired task");
    shared
        .metrics
        .task(TaskEvent::Revoked, job.message.task(), &job.held.queue);
    let exc = ExceptionInfo::new("celery.exceptions", "TaskRevokedError", "expired");
    shared.events.task(
        "task-revoked",
        vec![
            ("uuid", json!(job.message.id())),
            ("terminated", json!(false)),
            ("signum", Value::Null),
            ("expired", json!(true)),
        ],
    );
    let meta = shared
        .store_results(&job)
        .then(|| shared.meta(&job, State::Revoked, json!(exc), None));
    let _ = shared.commit.send(Commit::Done {
        meta: meta.map(Box::new),
        ack: Ack::Late(job.held.tag, job.holds_slot),
    });
}

/// Puts never-started jobs back at the front of their queues.
#[allow(clippy::vec_box)] // jobs travel boxed through channels; unboxing here would copy them
async fn give_back(shared: &Shared, jobs: Vec<Box<Job>>) {
    if jobs.is_empty() {
        return;
    }
    for j in &jobs {
        shared.unwait(j.message.id());
    }
    let held: Vec<&Held> = jobs.iter().map(|j| &j.held).collect();
    match shared.broker.requeue(&held, true).await {
        Ok(n) => info!(restored = n, "Restoring {n} unacknowledged message(s)"),
        Err(e) => {
            error!(error = %e, "giving back prefetched messages failed; the visibility timeout will restore them")
        }
    }
    for j in &jobs {
        shared.release(&j.held.tag, j.holds_slot);
    }
}

/// Starts jobs while concurrency allows.
async fn dispatcher(
    shared: Arc<Shared>,
    mut ready: mpsc::UnboundedReceiver<Box<Job>>,
    warm: CancellationToken,
) {
    let slots = Arc::clone(&shared.concurrency);
    let mut running = JoinSet::new();
    // Rate-limited jobs waiting for their turn; they give their prefetch slot back while they wait, and at
    // most `prefetch` of one task wait in memory (the rest are parked in the broker until their turn).
    let mut delayed: JoinSet<(Box<Job>, bool)> = JoinSet::new();
    let mut waiting: HashMap<String, usize> = HashMap::new();
    let mut unstarted = Vec::new();
    loop {
        while running.try_join_next().is_some() {}
        let mut job = tokio::select! {
            biased;
            _ = warm.cancelled() => break,
            Some(Ok((job, _))) = delayed.join_next(), if !delayed.is_empty() => {
                if let Some(n) = waiting.get_mut(job.message.task()) {
                    *n = n.saturating_sub(1);
                }
                job
            }
            j = ready.recv() => match j { Some(j) => j, None => break },
        };
        if let Some(limiter) = shared.limiter(job.message.task())
            && let Some(wait) = limiter.check(shared.broker.as_ref()).await
        {
            if job.holds_slot {
                job.holds_slot = false;
                shared.slots.prefetch.add_permits(1);
            }
            let n = waiting.entry(job.message.task().to_string()).or_default();
            if *n >= shared.settings.prefetch() {
                let due = chrono::Utc::now() + chrono::Duration::from_std(wait).unwrap_or_default();
                match shared.broker.park(&job.held, due).await {
                    Ok(_) => {
                        shared.unwait(job.message.id());
                        shared.release(&job.held.tag, false);
                        continue;
                    }
                    Err(e) => {
                        warn!(error = %e, "parking a rate-limited task failed; holding it in memory")
                    }
                }
            }
            *n += 1;
            delayed.spawn(hold(job, wait, warm.clone()));
            continue;
        }
        let permit = tokio::select! {
            p = Arc::clone(&slots).acquire_owned() => p.expect("never closed"),
            _ = warm.cancelled() => {
                unstarted.push(job);
                break;
            }
        };
        if job.acks_late {
            let exc = ExceptionInfo::new(
                "billiard.exceptions",
                "WorkerLostError",
                "Worker exited prematurely: abandoned at the warm-shutdown timeout",
            );
            let late = LateJob {
                held: job.held.clone(),
                meta: shared.meta(&job, State::Failure, json!(exc), None),
                holds_slot: job.holds_slot,
                reject_on_worker_lost: job
                    .task
                    .options
                    .reject_on_worker_lost
                    .unwrap_or(shared.settings.reject_on_worker_lost),
            };
            shared
                .running_late
                .lock()
                .expect("running_late")
                .insert(job.held.tag.clone(), late);
        } else {
            shared.slots.queue_ack(job.held.tag.clone(), job.holds_slot);
        }
        let shared = Arc::clone(&shared);
        running.spawn(async move {
            execute(&shared, job).await;
            drop(permit);
        });
    }
    // Warm shutdown. Messages that never started go back (the fetcher closes the channel when it stops).
    while let Some(Ok((job, _))) = delayed.join_next().await {
        unstarted.push(job);
    }
    while let Some(job) = ready.recv().await {
        unstarted.push(job);
    }
    give_back(&shared, unstarted).await;
    if !running.is_empty() {
        info!(running = running.len(), timeout = ?shared.settings.shutdown_timeout, "waiting for running tasks");
    }
    let drained = tokio::time::timeout(shared.settings.shutdown_timeout, async {
        while running.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        running.abort_all();
        while running.join_next().await.is_some() {}
        let abandoned: Vec<LateJob> = shared
            .running_late
            .lock()
            .expect("running_late")
            .drain()
            .map(|(_, j)| j)
            .collect();
        warn!(
            abandoned = abandoned.len(),
            "warm-shutdown timeout: abandoning running tasks"
        );
        // As Celery treats a lost acks_late task: requeue it when task_reject_on_worker_lost, otherwise
        // fail it with WorkerLostError and ack it.
        let (requeue, fail): (Vec<LateJob>, Vec<LateJob>) =
            abandoned.into_iter().partition(|j| j.reject_on_worker_lost);
        let refs: Vec<&Held> = requeue.iter().map(|j| &j.held).collect();
        if let Err(e) = shared.broker.requeue(&refs, true).await {
            error!(error = %e, "giving back abandoned tasks failed; the visibility timeout will restore them");
        }
        for j in requeue {
            shared.release(&j.held.tag, j.holds_slot);
        }
        for j in fail {
            let _ = shared.commit.send(Commit::Done {
                meta: Some(Box::new(j.meta)),
                ack: Ack::Late(j.held.tag, j.holds_slot),
            });
        }
    }
}

/// Runs one job and hands its outcome to the committer.
async fn execute(shared: &Arc<Shared>, mut job: Box<Job>) {
    let started = Instant::now();
    let name = job.message.task().to_string();
    let queue = job.held.queue.clone();
    let opts = &job.task.options;
    shared.metrics.task(TaskEvent::Started, &name, &queue);
    shared.metrics.tasks_active.inc();
    shared
        .events
        .active
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    shared
        .events
        .task("task-started", vec![("uuid", json!(job.message.id()))]);
    let terminate = CancellationToken::new();
    shared.unwait(job.message.id());
    shared.running.lock().expect("running").insert(
        job.message.id().to_string(),
        pidbox::running_from(&job, &shared.settings.hostname, terminate.clone()),
    );
    if opts.track_started.unwrap_or(shared.settings.track_started) {
        let info = json!({"pid": std::process::id(), "hostname": shared.settings.hostname});
        let meta = shared.meta(&job, State::Started, info, None);
        // STARTED follows the early ack too: Celery acks before the task runs.
        let ack = match Ack::of(&job) {
            Ack::Late(..) => Ack::None,
            early => early,
        };
        let _ = shared.commit.send(Commit::Done {
            meta: Some(Box::new(meta)),
            ack,
        });
    }
    let cancel = CancellationToken::new();
    let started_children: Arc<Mutex<Vec<Value>>> = Default::default();
    let ctx = TaskContext {
        id: job.message.id().to_string(),
        name: name.clone(),
        retries: job.message.headers.retries,
        hostname: shared.settings.hostname.clone(),
        queue: queue.clone(),
        redelivered: job.held.redelivered,
        cancel: cancel.clone(),
        state: Some(state_sink(shared, &job)),
        root_id: job
            .message
            .headers
            .root_id
            .clone()
            .unwrap_or_else(|| job.message.id().to_string()),
        canvas: Some(Arc::new(canvas_flow::Publisher(shared.canvas.clone()))),
        peers: Arc::clone(&shared.settings.peers),
        limiter: Some(Arc::new(canvas_flow::BrokerLimiter(Arc::clone(
            &shared.broker,
        )))),
        children: Arc::clone(&started_children),
    };
    // Limits: the message's `timelimit` header, then the task's options, then the worker's settings.
    let (h_hard, h_soft) = job.message.headers.time_limits();
    let (c_hard, c_soft) = shared
        .time_limits
        .read()
        .expect("time_limits")
        .get(&name)
        .copied()
        .unwrap_or((None, None));
    let hard = h_hard
        .or(c_hard)
        .or(opts.time_limit)
        .or(shared.settings.time_limit)
        .filter(|t| *t > 0.0);
    let soft = h_soft
        .or(c_soft)
        .or(opts.soft_time_limit)
        .or(shared.settings.soft_time_limit)
        .filter(|t| *t > 0.0);
    let args = std::mem::take(&mut job.message.args);
    let kwargs = std::mem::take(&mut job.message.kwargs);
    let extended = shared
        .settings
        .result_extended
        .then(|| (args.clone(), kwargs.clone()));
    let outcome = match job.task.bind(args, kwargs) {
        Err(e) => Err(e),
        Ok(bound) => {
            let run = async {
                match &job.task.handler {
                    Handler::Async(h) => AssertUnwindSafe(h(ctx, bound))
                        .catch_unwind()
                        .await
                        .unwrap_or_else(|p| Err(panicked(panic_message(p)))),
                    Handler::Blocking(h) => {
                        let h = Arc::clone(h);
                        match tokio::task::spawn_blocking(move || h(ctx, bound)).await {
                            Ok(r) => r,
                            Err(e) if e.is_panic() => Err(panicked(panic_message(e.into_panic()))),
                            Err(e) => Err(panicked(e.to_string())),
                        }
                    }
                }
            };
            tokio::select! {
                r = with_time_limits(run, hard, soft, &cancel) => r,
                _ = terminate.cancelled() => {
                    cancel.cancel();
                    Err(TaskError::Ignore)
                }
            }
        }
    };
    let runtime = started.elapsed().as_secs_f64();
    shared.metrics.tasks_active.dec();
    shared
        .events
        .active
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    shared
        .running
        .lock()
        .expect("running")
        .remove(job.message.id());
    shared
        .events
        .processed
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    shared.metrics.runtime(&name, &queue, runtime);
    if terminate.is_cancelled() {
        // `revoke(terminate=True)`: REVOKED "terminated", the slot freed, the message acked.
        shared.metrics.task(TaskEvent::Revoked, &name, &queue);
        shared.events.task(
            "task-revoked",
            vec![
                ("uuid", json!(job.message.id())),
                ("terminated", json!(true)),
                ("signum", json!(15)),
                ("expired", json!(false)),
            ],
        );
        let meta = shared.revoked_meta(&job, "terminated");
        if job.acks_late {
            shared
                .running_late
                .lock()
                .expect("running_late")
                .remove(&job.held.tag);
        }
        let _ = shared.commit.send(Commit::Done {
            meta,
            ack: Ack::of(&job),
        });
        return;
    }
    let outcome = autoretry(&job, outcome);
    let outcome = match outcome {
        Err(TaskError::Retry {
            countdown,
            eta,
            exc,
            max_retries,
        }) => retry(shared, &job, countdown, eta, exc, max_retries).await,
        other => other,
    };
    let store = shared.store_results(&job);
    let id = job.message.id().to_string();
    let ack = Ack::of(&job);
    // Celery's order: publish callbacks and the next chain step, store the result, then the chord part. A
    // callback the broker refused (a full queue) or never confirmed fails the task, as an exception raised
    // while applying callbacks does in Celery: nothing is dropped silently.
    let mut published = Vec::new();
    let outcome = match outcome {
        Ok(value) => match canvas_flow::on_success(shared, &job, &value).await {
            Ok(children) => {
                published = children;
                Ok(value)
            }
            Err(e) => {
                error!(task = %name, %id, error = %e, "publishing the task's callbacks failed; the task fails");
                Err(TaskError::Failed(ExceptionInfo::new(
                    "kombu.exceptions",
                    "OperationalError",
                    e,
                )))
            }
        },
        other => other,
    };
    let mut chord_part = None;
    let meta = match outcome {
        Ok(value) => {
            shared.metrics.task(TaskEvent::Succeeded, &name, &queue);
            if shared.events.task_events() {
                shared.events.task(
                    "task-succeeded",
                    vec![
                        ("uuid", json!(id)),
                        ("result", json!(celeriac_protocol::repr::repr(&value))),
                        ("runtime", json!(runtime)),
                    ],
                );
            }
            debug!(task = %name, %id, runtime, "Task succeeded");
            let mut children = std::mem::take(&mut *started_children.lock().expect("children"));
            children.append(&mut published);
            chord_part = Some(("SUCCESS", value.clone()));
            store.then(|| {
                let mut m = shared.meta(&job, State::Success, value, extended);
                m.children = Some(children);
                m
            })
        }
        Err(TaskError::Failed(exc)) => {
            shared.metrics.failed(&name, &queue, &exc.exc_type);
            shared.events.task(
                "task-failed",
                vec![
                    ("uuid", json!(id)),
                    ("exception", json!(exc.repr())),
                    ("traceback", json!(exc.traceback(&name))),
                ],
            );
            warn!(task = %name, %id, runtime, exception = %exc.repr(), "Task raised");
            chord_part = Some(("FAILURE", json!(exc)));
            let m = store.then(|| {
                let mut m = shared.meta(&job, State::Failure, json!(exc), extended);
                m.traceback = Some(exc.traceback(&name));
                m
            });
            canvas_flow::on_failure(shared, &job, &exc).await;
            m
        }
        Err(TaskError::Retry { exc, countdown, .. }) => {
            // Republished: store RETRY with the exception; the retry message is this task's child.
            shared.metrics.task(TaskEvent::Retried, &name, &queue);
            if let Some(e) = &exc {
                shared.events.task(
                    "task-retried",
                    vec![
                        ("uuid", json!(id)),
                        ("exception", json!(e.repr())),
                        ("traceback", json!(e.traceback(&name))),
                    ],
                );
            } else {
                shared.events.task(
                    "task-retried",
                    vec![
                        ("uuid", json!(id)),
                        ("exception", json!("Retry()")),
                        ("traceback", Value::Null),
                    ],
                );
            }
            info!(task = %name, %id, countdown, "Task retry scheduled");
            let result = exc.as_ref().map(|e| json!(e)).unwrap_or(Value::Null);
            let mut m = shared.meta(&job, State::Retry, result, None);
            m.traceback = exc.as_ref().map(|e| e.traceback(&name));
            m.children = Some(vec![json!([[id, null], null])]);
            Some(m)
        }
        Err(TaskError::Ignore) => None,
        Err(TaskError::Reject { requeue, reason }) => {
            shared.metrics.task(TaskEvent::Rejected, &name, &queue);
            shared.events.task(
                "task-rejected",
                vec![("uuid", json!(id)), ("requeue", json!(requeue))],
            );
            info!(task = %name, %id, requeue, %reason, "Task rejected");
            if requeue && job.acks_late {
                shared
                    .running_late
                    .lock()
                    .expect("running_late")
                    .remove(&job.held.tag);
                if let Err(e) = shared.broker.requeue(&[&job.held], false).await {
                    error!(error = %e, "requeue failed; the visibility timeout will restore the message");
                }
                shared.release(&job.held.tag, job.holds_slot);
                return;
            }
            store.then(|| {
                let exc = ExceptionInfo {
                    exc_type: "Reject".into(),
                    exc_message: vec![reason.into(), requeue.into()],
                    exc_module: Some("celery.exceptions".into()),
                };
                shared.meta(&job, State::Failure, json!(exc), extended)
            })
        }
    };
    if job.acks_late {
        shared
            .running_late
            .lock()
            .expect("running_late")
            .remove(&job.held.tag);
    }
    let _ = shared.commit.send(Commit::Done {
        meta: meta.map(Box::new),
        ack,
    });
    if let Some((state, result)) = chord_part {
        canvas_flow::chord_part_return(shared, &job, state, &result).await;
    }
}

/// `update_state` for one job: custom states go through the committer, in order with the final result.
fn state_sink(shared: &Arc<Shared>, job: &Job) -> celeriac_task::StateSink {
    let tx = shared.commit.clone();
    let (id, group, parent, reply_to) = (
        job.message.headers.id.clone(),
        job.message.headers.group.clone(),
        job.message.headers.parent_id.clone(),
        job.message.properties.reply_to.clone(),
    );
    Arc::new(move |state: &str, meta: Value| {
        let mut m = ResultMeta::new(id.clone(), State::parse(state), meta);
        if m.status.is_ready() {
            m.date_done = Some(time::isoformat(chrono::Utc::now()));
        }
        m.group_id = group.clone();
        m.parent_id = parent.clone();
        m.reply_to = reply_to.clone();
        let _ = tx.send(Commit::Done {
            meta: Some(Box::new(m)),
            ack: Ack::None,
        });
    })
}

/// Runs a task under its time limits: at the soft limit the task's cancellation token fires (it may clean
/// up and return); at the hard limit it is abandoned with `TimeLimitExceeded` and its slot freed.
async fn with_time_limits<F>(
    run: F,
    hard: Option<f64>,
    soft: Option<f64>,
    cancel: &CancellationToken,
) -> Result<Value, TaskError>
where
    F: std::future::Future<Output = Result<Value, TaskError>>,
{
    if hard.is_none() && soft.is_none() {
        return run.await;
    }
    let sleep_for = |s: Option<f64>| async move {
        match s {
            Some(s) => tokio::time::sleep(Duration::from_secs_f64(s)).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(run);
    let soft_timer = sleep_for(soft);
    let hard_timer = sleep_for(hard);
    tokio::pin!(soft_timer, hard_timer);
    let mut soft_fired = false;
    loop {
        tokio::select! {
            r = &mut run => return r,
            _ = &mut soft_timer, if !soft_fired => {
                soft_fired = true;
                cancel.cancel();
            }
            _ = &mut hard_timer => {
                cancel.cancel();
                // As Python Celery stores it (billiard's class, re-exported by celery.exceptions).
                return Err(TaskError::exception(
                    Some("billiard.exceptions"),
                    "TimeLimitExceeded",
                    vec![json!(hard.unwrap_or_default())],
                ));
            }
        }
    }
}

/// `autoretry_for`: a failure of a listed class becomes a retry, with exponential backoff when configured.
fn autoretry(job: &Job, outcome: Result<Value, TaskError>) -> Result<Value, TaskError> {
    let o = &job.task.options;
    let Err(TaskError::Failed(exc)) = &outcome else {
        return outcome;
    };
    let Some(kinds) = &o.autoretry_for else {
        return outcome;
    };
    if !kinds
        .iter()
        .any(|k| k == &exc.exc_type || k == "Exception" || k == "BaseException")
    {
        return outcome;
    }
    // Celery: factor = int(max(1.0, retry_backoff)).
    let countdown = o.retry_backoff.filter(|f| *f > 0.0).map(|factor| {
        backoff(
            factor.max(1.0).trunc(),
            job.message.headers.retries,
            o.retry_backoff_max.unwrap_or(600.0),
            o.retry_jitter.unwrap_or(true),
            random_unit(),
        )
    });
    let Err(TaskError::Failed(exc)) = outcome else {
        unreachable!()
    };
    Err(TaskError::retry_with(exc, countdown))
}

/// Celery's `Task.retry`: past `max_retries` the task fails with its exception (or
/// `MaxRetriesExceededError`); otherwise the message is republished with the same id, `retries + 1`, an ETA
/// and this task as parent, routed back to the queue it came from. The retry is returned unchanged when it
/// was published, so the caller stores RETRY.
async fn retry(
    shared: &Shared,
    job: &Job,
    countdown: Option<f64>,
    eta: Option<chrono::DateTime<chrono::Utc>>,
    exc: Option<ExceptionInfo>,
    max_retries: Option<i64>,
) -> Result<Value, TaskError> {
    let o = &job.task.options;
    let h = &job.message.headers;
    let max = max_retries.or(o.max_retries).unwrap_or(3);
    if max >= 0 && h.retries + 1 > max {
        return Err(TaskError::Failed(exc.unwrap_or_else(|| {
            ExceptionInfo::new(
                "celery.exceptions",
                "MaxRetriesExceededError",
                format!(
                    "Can't retry {}[{}] args:{} kwargs:{}",
                    h.task,
                    h.id,
                    h.argsrepr.as_deref().unwrap_or("()"),
                    h.kwargsrepr.as_deref().unwrap_or("{}")
                ),
            )
        })));
    }
    let delay = countdown.unwrap_or_else(|| o.default_retry_delay.unwrap_or(180.0));
    let when = eta.unwrap_or_else(|| {
        chrono::Utc::now() + chrono::Duration::microseconds((delay * 1e6) as i64)
    });
    let republish = async {
        let mut msg = Envelope::parse(&job.held.raw)
            .and_then(Envelope::into_task)
            .map_err(|e| e.to_string())?;
        msg.headers.retries += 1;
        msg.headers.eta = Some(time::isoformat(when));
        msg.headers.parent_id = Some(msg.headers.id.clone());
        msg.headers.extra.shift_remove("redelivered");
        shared
            .broker
            .publish(&msg, &job.held.routing_key)
            .await
            .map_err(|e| e.to_string())
    };
    match republish.await {
        Ok(()) => Err(TaskError::Retry {
            countdown: Some(delay),
            eta: Some(when),
            exc,
            max_retries,
        }),
        Err(e) => {
            // As Celery: a retry that cannot be published fails the task.
            error!(task = %h.task, id = %h.id, error = %e, "publishing the retry failed");
            Err(TaskError::Failed(exc.unwrap_or_else(|| {
                ExceptionInfo::new("celery.exceptions", "Reject", e)
            })))
        }
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "task panicked".into()
    }
}

fn panicked(message: String) -> TaskError {
    TaskError::exception(
        Some("celeriac.exceptions"),
        "TaskPanicked",
        vec![Value::String(message)],
    )
}

/// Applies early acks the fetcher did not take within 2 ms; on stop, applies whatever is left.
async fn ack_flusher(slots: Arc<Slots>, broker: Arc<dyn Broker>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = slots.wake_flusher.notified() => {}
            _ = stop.cancelled() => break,
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
        let acks = slots.take_acks();
        ack_all(&slots, broker.as_ref(), acks).await;
    }
    let acks = slots.take_acks();
    ack_all(&slots, broker.as_ref(), acks).await;
}

/// Batches stores and acks. Runs until every sender is gone and the channel is drained.
async fn committer(
    slots: Arc<Slots>,
    broker: Arc<dyn Broker>,
    backend: Arc<dyn ResultBackend>,
    mut rx: mpsc::UnboundedReceiver<Commit>,
    peers: Arc<celeriac_task::Peers>,
) {
    let mut buf = Vec::with_capacity(1024);
    while rx.recv_many(&mut buf, 1024).await > 0 {
        let mut metas = Vec::new();
        let mut early = Vec::new();
        let mut late = Vec::new();
        for Commit::Done { meta, ack } in buf.drain(..) {
            let stored = meta.is_some();
            if let Some(m) = meta {
                metas.push(*m);
            }
            match ack {
                Ack::None => {}
                Ack::Early(tag) if stored => early.push(tag),
                Ack::Early(_) => {}
                Ack::Late(tag, slot) => late.push((tag, slot)),
            }
        }
        settle_early_acks(&slots, broker.as_ref(), &early).await;
        if store_all(backend.as_ref(), &metas, &peers).await {
            ack_all(&slots, broker.as_ref(), late).await;
        } else {
            // Results could not be stored: leave late-acked messages unacked so they run again.
            for (tag, slot) in late {
                slots.release(&tag, slot);
            }
        }
    }
}

/// Celery acks a message before its task runs; here the ack is queued then and applied in the fetcher's
/// next round trip. Before a result is stored its early ack must have landed, or a crash in between would
/// leave a finished task's message to be restored and run again: apply what is still queued, then wait for
/// acks in flight in a fetch (one round trip; a failed one hands them back to be applied here or by the
/// flusher).
async fn settle_early_acks(slots: &Slots, broker: &dyn Broker, tags: &[String]) {
    if tags.is_empty() {
        return;
    }
    loop {
        if !slots.holds_any(tags) {
            if let Err(e) = broker.flush_acks().await {
                warn!(error = %e, "waiting for acks to leave failed; storing results anyway");
            }
            return;
        }
        let pending = slots.take_acks();
        if !pending.is_empty() {
            ack_all(slots, broker, pending).await;
            continue;
        }
        let applied = slots.acked.notified();
        tokio::pin!(applied);
        applied.as_mut().enable();
        if !slots.holds_any(tags) {
            continue;
        }
        tokio::select! {
            _ = applied => {}
            // Acks handed back by a failed fetch wake the flusher, not us: look again now and then.
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
}

/// Tries of one batch of results or acks: 50 ms doubling to 5 s, about five minutes in all.
const STORE_ATTEMPTS: u32 = 66;

async fn ack_all(slots: &Slots, broker: &dyn Broker, acks: Vec<(String, bool)>) {
    if acks.is_empty() {
        return;
    }
    let tags: Vec<String> = acks.iter().map(|(t, _)| t.clone()).collect();
    // A broker restart takes seconds: keep trying for minutes (an ack lost now is a duplicate later).
    let mut delay = Duration::from_millis(50);
    for attempt in 1..=STORE_ATTEMPTS {
        match broker.ack(&tags).await {
            Ok(()) => break,
            Err(e) if attempt < STORE_ATTEMPTS => {
                debug!(error = %e, attempt, "ack failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                error!(error = %e, count = tags.len(), "ack failed; these messages will be redelivered")
            }
        }
    }
    for (tag, slot) in acks {
        slots.release(&tag, slot);
    }
}

async fn store_all(
    backend: &dyn ResultBackend,
    metas: &[ResultMeta],
    peers: &celeriac_task::Peers,
) -> bool {
    if metas.is_empty() {
        return true;
    }
    // A result backend restart takes seconds: keep trying for minutes (late acks wait for their results).
    let mut delay = Duration::from_millis(50);
    for attempt in 1..=STORE_ATTEMPTS {
        match backend.store(metas).await {
            Ok(_) => {
                peers.up("result_backend");
                return true;
            }
            Err(e) if attempt < STORE_ATTEMPTS => {
                peers.down("result_backend", &e.to_string());
                debug!(error = %e, attempt, "storing results failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => error!(error = %e, count = metas.len(), "storing results failed"),
        }
    }
    false
}

/// Lease renewal, visibility restore, queue-length gauges.
async fn housekeeping(shared: Arc<Shared>, stop: CancellationToken) {
    let vt = shared.settings.visibility_timeout;
    let renew_every = (vt / 4).max(Duration::from_millis(500));
    let sweep_every = (vt / 2).clamp(Duration::from_secs(1), Duration::from_secs(60));
    let mut renew = tokio::time::interval(renew_every);
    let mut sweep = tokio::time::interval(sweep_every);
    let mut lengths = tokio::time::interval(Duration::from_secs(5));
    let mut unpark = tokio::time::interval(Duration::from_millis(500));
    unpark.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = renew.tick() => {
                let tags: Vec<String> = shared.slots.held.lock().expect("held").iter().cloned().collect();
                if let Err(e) = shared.broker.renew(&tags).await {
                    warn!(error = %e, "renewing visibility leases failed");
                }
            }
            _ = sweep.tick() => {
                if let Err(e) = shared.broker.restore_visible().await {
                    warn!(error = %e, "visibility-timeout sweep failed");
                }
            }
            _ = unpark.tick() => {
                // Parked ETA tasks due within the horizon come back; the last stretch waits in memory.
                let lookahead = shared.settings.eta_horizon.min(Duration::from_secs(1));
                let by = chrono::Utc::now() + chrono::Duration::from_std(lookahead).unwrap_or_default();
                match shared.broker.unpark_due(&shared.current_queues(), by).await {
                    Ok(0) => {}
                    Ok(n) => debug!(n, "republished parked ETA tasks"),
                    Err(e) => warn!(error = %e, "republishing parked ETA tasks failed"),
                }
            }
            _ = lengths.tick() => {
                for q in &shared.current_queues() {
                    match shared.broker.queue_length(q).await {
                        Ok(n) => { shared.metrics.queue_length.get_or_create(&QueueLabels { queue_name: q.clone() }).set(n as i64); }
                        Err(e) => warn!(error = %e, queue = %q, "reading queue length failed"),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn sleeper(secs: u64, cancel: CancellationToken) -> Result<Value, TaskError> {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(secs)) => Ok(json!("finished")),
            _ = cancel.cancelled() => Ok(json!("cleaned up")),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn soft_limit_signals_the_task_which_may_return() {
        let cancel = CancellationToken::new();
        let t0 = tokio::time::Instant::now();
        let r =
            with_time_limits(sleeper(100, cancel.clone()), Some(10.0), Some(2.0), &cancel).await;
        assert_eq!(r.unwrap(), json!("cleaned up"));
        assert_eq!(t0.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn hard_limit_abandons_the_task() {
        let cancel = CancellationToken::new();
        let ignores_cancel = async {
            tokio::time::sleep(Duration::from_secs(100)).await;
            Ok(json!("too late"))
        };
        let t0 = tokio::time::Instant::now();
        let r = with_time_limits(ignores_cancel, Some(3.0), Some(1.0), &cancel).await;
        assert_eq!(t0.elapsed(), Duration::from_secs(3));
        assert!(cancel.is_cancelled());
        let Err(TaskError::Failed(e)) = r else {
            panic!("{r:?}")
        };
        assert_eq!(
            (e.exc_type.as_str(), e.exc_module.as_deref(), e.exc_message),
            (
                "TimeLimitExceeded",
                Some("billiard.exceptions"),
                vec![json!(3.0)]
            )
        );
    }

    #[tokio::test(start_paused = true)]
    async fn no_limits_no_timers() {
        let cancel = CancellationToken::new();
        let r = with_time_limits(sleeper(50, cancel.clone()), None, None, &cancel).await;
        assert_eq!(r.unwrap(), json!("finished"));
        assert!(!cancel.is_cancelled());
    }

    #[test]
    fn local_rate_limit_spaces_tasks() {
        let limiter = Limiter::new(
            "t",
            RateLimit {
                interval: Duration::from_millis(250),
                cluster: false,
            },
        );
        let Limiter::Local(l) = &limiter else {
            panic!()
        };
        assert!(l.check().is_ok(), "the first task runs at once");
        let wait = match l.check() {
            Err(not_until) => {
                use governor::clock::Clock;
                not_until.wait_time_from(governor::clock::DefaultClock::default().now())
            }
            Ok(()) => panic!("a second task within 250 ms must wait"),
        };
        assert!(
            wait > Duration::from_millis(200) && wait <= Duration::from_millis(250),
            "{wait:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn eta_timers_fire_in_due_order_and_shutdown_returns_the_rest() {
        let warm = CancellationToken::new();
        let mut timers = JoinSet::new();
        for (name, secs) in [("c", 30), ("a", 10), ("b", 20), ("late", 3600)] {
            timers.spawn(hold(name, Duration::from_secs(secs), warm.clone()));
        }
        let t0 = tokio::time::Instant::now();
        let mut fired = Vec::new();
        for _ in 0..3 {
            let (name, due) = timers.join_next().await.unwrap().unwrap();
            assert!(due);
            fired.push((name, t0.elapsed().as_secs()));
        }
        assert_eq!(fired, [("a", 10), ("b", 20), ("c", 30)]);
        warm.cancel();
        let (name, due) = timers.join_next().await.unwrap().unwrap();
        assert_eq!(
            (name, due),
            ("late", false),
            "a warm shutdown hands back what has not fired"
        );
        assert_eq!(t0.elapsed().as_secs(), 30);
    }

    #[test]
    fn random_unit_is_in_range() {
        for _ in 0..1000 {
            let u = random_unit();
            assert!((0.0..1.0).contains(&u), "{u}");
        }
    }
}

/// What a finished task publishes next: callbacks, chain steps, errbacks, chord bodies (Celery's
/// `_dispatch_callbacks_and_chain`, `_call_task_errbacks`, `on_chord_part_return`).
mod canvas_flow {
    use super::*;
    use celeriac_canvas::{Applied, ApplyOptions};

    /// What a task uses to start canvases itself (`ctx.apply`): the worker's canvas publisher.
    pub(super) struct Publisher(pub(super) celeriac_canvas::Canvas);

    /// The cluster-wide limiter tasks use (`ctx.limiter`): the broker's shared token bucket.
    pub(super) struct BrokerLimiter(pub(super) Arc<dyn Broker>);

    impl celeriac_task::SharedLimiter for BrokerLimiter {
        fn take<'a>(
            &'a self,
            key: &'a str,
            interval: Duration,
            burst: u32,
        ) -> futures::future::BoxFuture<'a, Result<Option<Duration>, String>> {
            Box::pin(async move {
                self.0
                    .take_shared_token(key, interval, burst)
                    .await
                    .map_err(|e| e.to_string())
            })
        }
    }

    impl celeriac_task::CanvasPublisher for Publisher {
        fn apply<'a>(
            &'a self,
            sig: &'a Value,
            parent_id: &'a str,
            root_id: &'a str,
        ) -> futures::future::BoxFuture<'a, Result<Value, String>> {
            Box::pin(async move {
                let opts = ApplyOptions {
                    parent_id: Some(parent_id.to_string()),
                    root_id: Some(root_id.to_string()),
                    ..Default::default()
                };
                self.0
                    .apply(sig, &[], opts)
                    .await
                    .map(|a| a.as_tuple())
                    .map_err(|e| e.to_string())
            })
        }
    }

    fn base(job: &Job) -> ApplyOptions {
        let h = &job.message.headers;
        ApplyOptions {
            parent_id: Some(h.id.clone()),
            root_id: Some(h.root_id.clone().unwrap_or_else(|| h.id.clone())),
            ..Default::default()
        }
    }

    fn is_group(s: &Value) -> bool {
        s.get("subtask_type").and_then(Value::as_str) == Some("group")
    }

    async fn apply(
        shared: &Shared,
        sig: &Value,
        args: &[Value],
        opts: ApplyOptions,
    ) -> Option<Applied> {
        match shared.canvas.apply(sig, args, opts).await {
            Ok(a) => Some(a),
            Err(e) => {
                error!(error = %e, signature = %sig, "publishing a callback failed");
                None
            }
        }
    }

    async fn try_apply(
        shared: &Shared,
        sig: &Value,
        args: &[Value],
        opts: ApplyOptions,
    ) -> Result<Applied, String> {
        shared
            .canvas
            .apply(sig, args, opts)
            .await
            .map_err(|e| e.to_string())
    }

    /// Publishes callbacks (one: as is; several: plain ones as one group, groups separately) and the next
    /// chain step, each with the result prepended. Returns the children as Celery records them, or why a
    /// publish failed (the broker refused or never confirmed it): the task then fails, as in Celery.
    pub(super) async fn on_success(
        shared: &Shared,
        job: &Job,
        value: &Value,
    ) -> Result<Vec<Value>, String> {
        let args = std::slice::from_ref(value);
        let mut children = Vec::new();
        if let Some(callbacks) = job
            .message
            .embed
            .callbacks
            .as_ref()
            .filter(|c| !c.is_empty())
        {
            if callbacks.len() == 1 {
                children.push(try_apply(shared, &callbacks[0], args, base(job)).await?);
            } else {
                let (groups, plain): (Vec<&Value>, Vec<&Value>) =
                    callbacks.iter().partition(|c| is_group(c));
                for g in groups {
                    children.push(try_apply(shared, g, args, base(job)).await?);
                }
                if !plain.is_empty() {
                    let g = celeriac_canvas::group(plain.into_iter().cloned().collect());
                    children.push(try_apply(shared, &g, args, base(job)).await?);
                }
            }
        }
        if let Some(chain) = job.message.embed.chain.as_ref().filter(|c| !c.is_empty()) {
            let mut rest = chain.clone();
            let next = rest.pop().expect("non-empty");
            let opts = ApplyOptions {
                chain: (!rest.is_empty()).then_some(rest),
                ..base(job)
            };
            children.push(try_apply(shared, &next, args, opts).await?);
        }
        Ok(children.iter().map(Applied::as_tuple).collect())
    }

    /// A failed task fails the rest of its chain with the same exception, then its errbacks are published as
    /// one group with the failed task's id as their argument.
    pub(super) async fn on_failure(shared: &Shared, job: &Job, exc: &ExceptionInfo) {
        if let Some(chain) = &job.message.embed.chain {
            for step in chain {
                if let Some(tid) = step.pointer("/options/task_id").and_then(Value::as_str) {
                    fail(shared, tid, exc, job.message.task());
                }
            }
        }
        if let Some(errbacks) = job
            .message
            .embed
            .errbacks
            .as_ref()
            .filter(|e| !e.is_empty())
        {
            let g = celeriac_canvas::group(errbacks.clone());
            apply(shared, &g, &[json!(job.message.id())], base(job)).await;
        }
    }

    fn fail(shared: &Shared, task_id: &str, exc: &ExceptionInfo, task: &str) {
        let mut m = ResultMeta::failure(task_id, exc, Some(exc.traceback(task)));
        m.date_done = Some(time::isoformat(chrono::Utc::now()));
        let _ = shared.commit.send(Commit::Done {
            meta: Some(Box::new(m)),
            ack: Ack::None,
        });
    }

    /// Records a chord header task's outcome; the one call that completes the chord publishes the body with
    /// the header results in order, or fails it with `ChordError` when a header task failed.
    pub(super) async fn chord_part_return(shared: &Shared, job: &Job, state: &str, result: &Value) {
        let h = &job.message.headers;
        let (Some(body), Some(gid)) = (&job.message.embed.chord, &h.group) else {
            return;
        };
        let ready = match shared
            .backend
            .chord_part_return(gid, &h.id, h.group_index, state, result)
            .await
        {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                error!(error = %e, group = %gid, "chord join failed");
                return;
            }
        };
        let body_id = body
            .pointer("/options/task_id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let failed = ready
            .results
            .iter()
            .find(|(_, st, _)| st == "FAILURE" || st == "REVOKED");
        if let Some((tid, _, r)) = failed {
            let repr = serde_json::from_value::<ExceptionInfo>(r.clone())
                .map(|e| e.repr())
                .unwrap_or_else(|_| r.to_string());
            let exc = ExceptionInfo::new(
                "celery.exceptions",
                "ChordError",
                format!("Dependency {tid} raised {repr}"),
            );
            warn!(group = %gid, body = %body_id, "chord header failed: {}", exc.repr());
            fail(
                shared,
                &body_id,
                &exc,
                body.get("task").and_then(Value::as_str).unwrap_or_default(),
            );
            if let Some(errbacks) = body
                .pointer("/options/link_error")
                .and_then(Value::as_array)
                .filter(|e| !e.is_empty())
            {
                let g = celeriac_canvas::group(errbacks.clone());
                apply(shared, &g, &[json!(body_id)], base(job)).await;
            }
            if let Err(e) = shared.backend.chord_finish(gid, &ready.token, true).await {
                warn!(error = %e, group = %gid, "chord cleanup failed");
            }
            return;
        }
        let values: Vec<Value> = ready.results.into_iter().map(|(_, _, r)| r).collect();
        apply(shared, body, &[Value::Array(values)], base(job)).await;
        if let Err(e) = shared.backend.chord_finish(gid, &ready.token, false).await {
            warn!(error = %e, group = %gid, "chord cleanup failed");
        }
    }
}

/// Remote control (kombu pidbox): answers `celery inspect` / `celery control` requests broadcast to every
/// worker, with Celery's reply shapes.
mod pidbox {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use futures::StreamExt;

    /// What `inspect active` shows of a running task.
    pub(super) struct Running {
        /// Celery's request info (`Request.info()`).
        pub info: Value,
        pub terminate: CancellationToken,
    }

    /// A received task not started yet.
    pub(super) struct Waiting {
        pub info: Value,
        /// Set while it waits for its ETA (`inspect scheduled`).
        pub eta: Option<String>,
    }

    /// Celery's `Request.info()`: what `inspect active/reserved/scheduled/query_task` show of a task.
    pub(super) fn request_info(
        job: &Job,
        hostname: &str,
        time_start: Option<f64>,
        acknowledged: bool,
        pid: Option<u32>,
    ) -> Value {
        let h = &job.message.headers;
        json!({"id": h.id, "name": h.task, "args": job.message.args, "kwargs": job.message.kwargs,
            "type": h.task, "hostname": hostname, "time_start": time_start, "acknowledged": acknowledged,
            "delivery_info": {"exchange": "", "routing_key": job.held.routing_key,
                "priority": job.message.properties.priority, "redelivered": job.held.redelivered},
            "worker_pid": pid})
    }

    fn unix_now() -> f64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64()
    }

    pub(super) fn running_from(job: &Job, hostname: &str, terminate: CancellationToken) -> Running {
        Running {
            info: request_info(
                job,
                hostname,
                Some(unix_now()),
                true,
                Some(std::process::id()),
            ),
            terminate,
        }
    }

    /// Python's `bool(value)` for JSON values.
    pub(super) fn truthy(v: &Value) -> bool {
        match v {
            Value::Null => false,
            Value::Bool(b) => *b,
            Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
            Value::String(s) => !s.is_empty(),
            Value::Array(a) => !a.is_empty(),
            Value::Object(o) => !o.is_empty(),
        }
    }

    fn reply_for(
        shared: &Shared,
        method: &str,
        args: &Value,
        clock: u64,
        started: Instant,
    ) -> Option<Value> {
        let s = &shared.settings;
        Some(match method {
            "ping" => json!({"ok": "pong"}),
            "clock" => json!({"clock": clock}),
            "registered" => {
                let names: Vec<String> = shared.registry.names().into_iter().filter(|n| !n.starts_with("celery.")).collect();
                json!(names)
            }
            "active_queues" => Value::Array(
                shared
                    .current_queues()
                    .iter()
                    .map(|q| {
                        json!({"name": q, "exchange": {"name": q, "type": "direct", "arguments": null, "durable": true,
                        "passive": false, "auto_delete": false, "delivery_mode": null, "no_declare": false},
                        "routing_key": q, "queue_arguments": null, "binding_arguments": null, "consumer_arguments": null,
                        "durable": true, "exclusive": false, "auto_delete": false, "no_ack": false, "alias": null,
                        "bindings": [], "no_declare": null, "expires": null, "message_ttl": null, "max_length": null,
                        "max_length_bytes": null, "max_priority": null})
                    })
                    .collect(),
            ),
            "active" => {
                let running = shared.running.lock().expect("running");
                Value::Array(running.values().map(|r| r.info.clone()).collect())
            }
            "reserved" => {
                let waiting = shared.waiting.lock().expect("waiting");
                Value::Array(
                    waiting
                        .values()
                        .filter(|w| w.eta.is_none())
                        .map(|w| w.info.clone())
                        .collect(),
                )
            }
            "scheduled" => {
                let waiting = shared.waiting.lock().expect("waiting");
                // Celery's timer entries for ETA tasks have priority 6.
                Value::Array(
                    waiting
                        .values()
                        .filter_map(|w| {
                            w.eta.as_ref().map(|eta| json!({"eta": eta, "priority": 6, "request": w.info}))
                        })
                        .collect(),
                )
            }
            "revoked" => {
                let mut ids: Vec<String> = shared.revoked.read().expect("revoked").iter().cloned().collect();
                ids.sort();
                json!(ids)
            }
            "conf" => {
                // Celery answers with the settings it was configured with (`with_defaults=False`).
                let routes: Map<String, Value> = s
                    .routes
                    .iter()
                    .map(|(task, queue)| (task.clone(), json!({"queue": queue})))
                    .collect();
                json!({
                    "task_default_queue": s.default_queue,
                    "task_routes": routes,
                    "worker_concurrency": s.concurrency,
                    "worker_prefetch_multiplier": s.prefetch_multiplier,
                    "task_acks_late": s.acks_late,
                    "task_reject_on_worker_lost": s.reject_on_worker_lost,
                    "task_ignore_result": s.ignore_result,
                    "result_extended": s.result_extended,
                    "task_track_started": s.track_started,
                    "task_acks_on_failure_or_timeout": s.acks_on_failure_or_timeout,
                    "task_time_limit": s.time_limit,
                    "task_soft_time_limit": s.soft_time_limit,
                    "worker_send_task_events": shared.events.task_events(),
                    "broker_transport_options": {"visibility_timeout": s.visibility_timeout.as_secs_f64()},
                    "include": [],
                })
            }
            "query_task" => {
                let ids: Vec<&str> = match args.get("ids") {
                    Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
                    Some(Value::String(one)) => vec![one.as_str()],
                    _ => Vec::new(),
                };
                let running = shared.running.lock().expect("running");
                let waiting = shared.waiting.lock().expect("waiting");
                let mut out = Map::new();
                for id in ids {
                    if let Some(r) = running.get(id) {
                        out.insert(id.to_string(), json!(["active", r.info]));
                    } else if let Some(w) = waiting.get(id) {
                        let state = if w.eta.is_some() { "scheduled" } else { "reserved" };
                        out.insert(id.to_string(), json!([state, w.info]));
                    }
                }
                Value::Object(out)
            }
            "stats" => json!({
                "total": shared.metrics.totals(),
                "pid": std::process::id(),
                "clock": clock.to_string(),
                "uptime": started.elapsed().as_secs(),
                "pool": {"implementation": "celeriac:tokio",
                    "max-concurrency": shared.concurrency_now.load(std::sync::atomic::Ordering::Relaxed),
                    "processes": [std::process::id()], "max-tasks-per-child": "N/A",
                    "put-guarded-by-semaphore": false, "timeouts": [0, 0], "writes": {}},
                "broker": {"transport": shared.broker.transport()},
                "prefetch_count": s.prefetch(),
                "rusage": {},
            }),
            "enable_events" => {
                let was = shared.events.set_task_events(true);
                json!({"ok": if was { "task events already enabled" } else { "task events enabled" }})
            }
            "disable_events" => {
                shared.events.set_task_events(false);
                json!({"ok": "task events disabled"})
            }
            "heartbeat" => {
                shared.events.worker("worker-heartbeat", 5.0);
                Value::Null
            }
            _ => {
                let _ = args;
                return None;
            }
        })
    }

    /// `revoke`: remembered by this worker, persisted for every worker and restart, REVOKED stored for tasks
    /// not running here; with `terminate`, running ones are stopped.
    async fn revoke(shared: &Shared, args: &Value, force_terminate: bool) -> Value {
        let ids: Vec<String> = match args.get("task_id") {
            Some(Value::String(id)) => vec![id.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        };
        // Python truthiness, as Celery's `if terminate:` (Flower sends `1`).
        let terminate = force_terminate || args.get("terminate").is_some_and(truthy);
        shared
            .revoked
            .write()
            .expect("revoked")
            .extend(ids.iter().cloned());
        // Celery keeps revokes 3 hours (REVOKE_EXPIRES); so do we, in the broker.
        if let Err(e) = shared
            .broker
            .add_revoked(&ids, Duration::from_secs(10_800))
            .await
        {
            warn!(error = %e, "persisting revoked ids failed");
        }
        let mut terminated = Vec::new();
        {
            let running = shared.running.lock().expect("running");
            for id in &ids {
                match running.get(id) {
                    Some(r) if terminate => {
                        r.terminate.cancel();
                        terminated.push(id.clone());
                    }
                    Some(_) => {}
                    None => {
                        let exc =
                            ExceptionInfo::new("celery.exceptions", "TaskRevokedError", "revoked");
                        let mut m = ResultMeta::new(id.clone(), State::Revoked, json!(exc));
                        m.children = None;
                        m.date_done = Some(time::isoformat(chrono::Utc::now()));
                        let _ = shared.commit.send(Commit::Done {
                            meta: Some(Box::new(m)),
                            ack: Ack::None,
                        });
                    }
                }
            }
        }
        if terminate {
            let which = if terminated.is_empty() {
                "tasks unknown".to_string()
            } else {
                terminated.join(", ")
            };
            json!({"ok": format!("terminate: {which}")})
        } else {
            let set: Vec<String> = ids.iter().map(|i| format!("'{i}'")).collect();
            json!({"ok": format!("tasks {{{}}} flagged as revoked", set.join(", "))})
        }
    }

    /// Commands that change the running worker. `Some(None)`: handled, no reply (shutdown); `None`: not one
    /// of these.
    async fn control(shared: &Arc<Shared>, method: &str, args: &Value) -> Option<Option<Value>> {
        let text = |k: &str| args.get(k).and_then(Value::as_str).map(str::to_string);
        let ok = |m: String| Some(Some(json!({"ok": m})));
        match method {
            "rate_limit" => {
                let task = text("task_name").unwrap_or_default();
                if shared.registry.get(&task).is_none() {
                    return Some(Some(json!({"error": format!("unknown task {task:?}")})));
                }
                let limiter = match args.get("rate_limit") {
                    None | Some(Value::Null) => None,
                    Some(v) => {
                        let r = v
                            .as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| v.to_string());
                        if r == "0" {
                            None
                        } else {
                            match RateLimit::parse(&r, false) {
                                Ok(rate) => Some(Arc::new(Limiter::new(&task, rate))),
                                Err(e) => return Some(Some(json!({"error": e}))),
                            }
                        }
                    }
                };
                let msg = if limiter.is_some() {
                    "new rate limit set successfully"
                } else {
                    "rate limit disabled successfully"
                };
                shared
                    .dyn_limiters
                    .write()
                    .expect("limiters")
                    .insert(task, limiter);
                ok(msg.into())
            }
            "time_limit" => {
                let task = text("task_name").unwrap_or_default();
                if shared.registry.get(&task).is_none() {
                    return Some(Some(json!({"error": format!("unknown task {task:?}")})));
                }
                let hard = args.get("hard").and_then(Value::as_f64);
                let soft = args.get("soft").and_then(Value::as_f64);
                shared
                    .time_limits
                    .write()
                    .expect("time_limits")
                    .insert(task, (hard, soft));
                ok("time limits set successfully".into())
            }
            "pool_grow" => {
                let n = args.get("n").and_then(Value::as_u64).unwrap_or(1) as usize;
                shared.concurrency.add_permits(n);
                shared
                    .concurrency_now
                    .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                ok("pool will grow".into())
            }
            "pool_shrink" => {
                let n = args.get("n").and_then(Value::as_u64).unwrap_or(1) as usize;
                let now = shared
                    .concurrency_now
                    .load(std::sync::atomic::Ordering::Relaxed);
                let n = n.min(now.saturating_sub(1));
                shared
                    .concurrency_now
                    .fetch_sub(n, std::sync::atomic::Ordering::Relaxed);
                let sem = Arc::clone(&shared.concurrency);
                // Slots are taken back as running tasks finish.
                tokio::spawn(async move {
                    if let Ok(p) = sem.acquire_many_owned(n as u32).await {
                        p.forget();
                    }
                });
                ok("pool will shrink".into())
            }
            "add_consumer" => {
                let queue = text("queue").unwrap_or_default();
                if queue.is_empty() {
                    return Some(Some(json!({"error": "no queue given"})));
                }
                if let Err(e) = shared.broker.declare(std::slice::from_ref(&queue)).await {
                    return Some(Some(json!({"error": e.to_string()})));
                }
                let mut queues = shared.queues.write().expect("queues");
                if queues.contains(&queue) {
                    return ok(format!("already consuming from {queue}"));
                }
                queues.push(queue.clone());
                ok(format!("add consumer {queue}"))
            }
            "cancel_consumer" => {
                let queue = text("queue").unwrap_or_default();
                shared
                    .queues
                    .write()
                    .expect("queues")
                    .retain(|q| *q != queue);
                // A fetch that read the old list may be blocked on the queue: end it and wait until what it
                // popped is given back, so after the reply nothing of `queue` is taken (as in Celery).
                let mut done = shared.fetched.subscribe();
                if shared.in_fetch.load(std::sync::atomic::Ordering::SeqCst) {
                    if let Err(e) = shared.broker.interrupt_fetch().await {
                        warn!(error = %e, "cancel_consumer: could not interrupt the fetch in flight");
                    }
                    let _ = tokio::time::timeout(Duration::from_secs(3), done.changed()).await;
                }
                ok(format!("no longer consuming from {queue}"))
            }
            "shutdown" => {
                warn!("remote control: shutdown requested");
                shared.warm.cancel();
                Some(None)
            }
            _ => None,
        }
    }

    /// Serves remote-control requests until `stop`.
    pub(super) async fn serve(shared: Arc<Shared>, stop: CancellationToken) {
        let started = Instant::now();
        let mut stream = match shared.broker.control_requests().await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "remote control unavailable");
                return;
            }
        };
        let clock = std::sync::atomic::AtomicU64::new(0);
        loop {
            let raw = tokio::select! {
                m = stream.next() => match m { Some(m) => m, None => break },
                _ = stop.cancelled() => break,
            };
            let Ok(env) = Envelope::parse(&raw) else {
                continue;
            };
            let Ok(body) = env.body_bytes() else { continue };
            let Ok(req) = serde_json::from_slice::<Value>(&body) else {
                continue;
            };
            let theirs = env
                .headers
                .get("clock")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            let now = clock
                .fetch_max(theirs, std::sync::atomic::Ordering::Relaxed)
                .max(theirs)
                + 1;
            clock.store(now, std::sync::atomic::Ordering::Relaxed);
            if !celeriac_protocol::pidbox::selected(&req, &shared.settings.hostname) {
                continue;
            }
            let method = req
                .get("method")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let arguments = req.get("arguments").cloned().unwrap_or(Value::Null);
            debug!(%method, "remote control request");
            let value = if method == "revoke" || method == "terminate" {
                Some(revoke(&shared, &arguments, method == "terminate").await)
            } else if let Some(v) = control(&shared, &method, &arguments).await {
                v
            } else {
                reply_for(&shared, &method, &arguments, now, started)
            };
            let Some(value) = value else {
                if method != "shutdown" {
                    warn!(%method, "unknown remote control command");
                }
                continue;
            };
            let (Some(ticket), Some(rk)) = (
                req.get("ticket").and_then(Value::as_str),
                req.pointer("/reply_to/routing_key").and_then(Value::as_str),
            ) else {
                continue;
            };
            let mut reply = Map::new();
            reply.insert(shared.settings.hostname.clone(), value);
            let envelope = json!({
                "body": STANDARD.encode(celeriac_protocol::json::to_vec(&reply)),
                "content-encoding": "utf-8",
                "content-type": "application/json",
                "headers": {"ticket": ticket, "clock": now},
                "properties": {"delivery_mode": 1,
                    "delivery_info": {"exchange": "reply.celery.pidbox", "routing_key": rk},
                    "priority": 0, "body_encoding": "base64", "delivery_tag": uuid::Uuid::new_v4().to_string()},
            });
            if let Err(e) = shared
                .broker
                .control_reply(rk, &celeriac_protocol::json::to_vec(&envelope))
                .await
            {
                warn!(error = %e, %method, "sending a remote control reply failed");
            }
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn python_truthiness() {
            use serde_json::json;
            assert!(super::truthy(&json!(1)));
            assert!(super::truthy(&json!(true)));
            assert!(super::truthy(&json!("SIGTERM")));
            assert!(!super::truthy(&json!(0)));
            assert!(!super::truthy(&json!(null)));
            assert!(!super::truthy(&json!(false)));
            assert!(!super::truthy(&json!("")));
        }
    }
}
