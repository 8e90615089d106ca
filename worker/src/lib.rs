//! The celeriac worker runtime: tasks registered by Celery name, a consume → prefetch → execute → ack loop
//! over any [`celeriac_broker::Broker`], results through any [`celeriac_backend::ResultBackend`], and
//! per-worker Prometheus metrics.
//!
//! # Layout
//! - [`config`]: Celery-named settings read from TOML.
//! - [`builtins`]: Celery's built-in `celery.map` / `celery.starmap`.
//! - [`registry`]: tasks, typed parameter binding, task context.
//! - [`runtime`]: the worker loop (fetcher, dispatcher, committer, housekeeping) and shutdown.
//! - [`events`]: Celery events (worker heartbeats, task events with `-E`).
//! - [`metrics`]: celery-exporter-compatible metrics, `/metrics` and `/health`.
//! - [`error`]: task outcomes ([`TaskError`]) and [`WorkerError`].

pub mod builtins;
pub mod config;
pub mod error;
pub mod events;
pub mod metrics;
pub mod registry;
pub mod runtime;

pub use error::{TaskError, WorkerError};
pub use registry::{Registry, TaskContext, TaskOptions};
pub use runtime::{Shutdown, WorkerSettings, run};
