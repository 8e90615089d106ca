//! [`WorkerSettings`]: everything a worker needs to run, already validated, with Celery's defaults.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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
    /// Once consuming, ask the kernel to reclaim the executable's resident code pages (Linux
    /// `MADV_PAGEOUT`): start-up touched code of every task family; an idle worker keeps only what it runs.
    /// For processes that are a worker and nothing else (the CLI sets it; off by default).
    pub release_startup_pages: bool,
}

impl Default for WorkerSettings {
    /// Celery's defaults: queue `celery`, one task per core, prefetch multiplier 4, early acks, results
    /// stored, a one-hour visibility timeout, 60 s of warm shutdown, no time limits, heartbeats without task
    /// events.
    fn default() -> Self {
        Self {
            hostname: "celery@localhost".into(),
            queues: vec!["celery".into()],
            concurrency: std::thread::available_parallelism().map_or(1, |n| n.get()),
            prefetch_multiplier: 4,
            acks_late: false,
            reject_on_worker_lost: false,
            ignore_result: false,
            result_extended: false,
            visibility_timeout: Duration::from_secs(3600),
            shutdown_timeout: Duration::from_secs(60),
            metrics_addr: None,
            time_limit: None,
            soft_time_limit: None,
            track_started: false,
            acks_on_failure_or_timeout: true,
            eta_horizon: Duration::from_secs(60),
            eta_max_in_memory: 10_000,
            default_queue: "celery".into(),
            routes: HashMap::new(),
            send_task_events: false,
            send_sent_event: false,
            heartbeat: true,
            peers: Arc::default(),
            release_startup_pages: false,
        }
    }
}

impl WorkerSettings {
    /// The prefetch limit.
    pub fn prefetch(&self) -> usize {
        self.concurrency * self.prefetch_multiplier
    }
}
