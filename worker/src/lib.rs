//! The celeriac worker runtime: tasks registered by Celery name, a consume → prefetch → execute → ack loop
//! over any [`celeriac_broker::Broker`], results through any [`celeriac_backend::ResultBackend`], and
//! per-worker Prometheus metrics.
//!
//! # Layout
//! - [`config`]: Celery-named settings read from TOML.
//! - [`builtins`]: Celery's built-in `celery.map` / `celery.starmap`.
//! - [`task`]: the task-author API (registry, task context, options, [`TaskError`]), re-exported from
//!   `celeriac-task`.
//! - [`runtime`]: the worker loop (fetcher, dispatcher, committer, housekeeping) and shutdown.
//! - [`events`]: Celery events (worker heartbeats, task events with `-E`).
//! - [`metrics`]: celery-exporter-compatible metrics, `/metrics` and `/health`.
//! - [`trace`]: W3C trace context in and out of task messages, a `run/<task>` span per task.
//! - [`error`]: why a worker stops ([`WorkerError`]).

pub mod builtins;
pub mod config;
pub mod error;
pub mod events;
pub mod metrics;
pub mod runtime;
pub mod telemetry;
pub mod trace;

pub use celeriac_task as task;
pub use celeriac_task::{Registry, TaskContext, TaskError, TaskOptions};
pub use error::WorkerError;
pub use runtime::{Shutdown, WorkerSettings, run, run_with_metrics};

/// This process's id, read once: `std::process::id()` is a system call each time (glibc stopped caching
/// it), and the worker names its pid for every task it starts and in every event it sends.
pub(crate) fn pid() -> u32 {
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *PID.get_or_init(std::process::id)
}
