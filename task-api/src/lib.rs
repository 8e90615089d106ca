//! The task-author API of celeriac: what a task family needs to define Celery tasks, without the runtime,
//! the transports or the result backends (the axum-core pattern: families depend on this crate only).
//!
//! # Layout
//! - [`registry`]: tasks registered by Celery name, Python-style argument binding.
//! - [`context`]: the running task's view of its request ([`TaskContext`]).
//! - [`options`]: per-task options ([`TaskOptions`]), rate limits, Celery's retry backoff.
//! - [`error`]: task outcomes ([`TaskError`]) that steer the runtime; [`args`]: argument checks with
//!   Python's wording ([`id_arg`], [`python_type_name`]).
//! - [`peers`]: the outside peers' health ([`Peers`]): one line per outage, `/health` and metrics.

pub mod args;
pub mod context;
pub mod error;
pub mod options;
pub mod peers;
pub mod registry;

pub use args::{id_arg, python_type_name};
pub use celeriac_protocol::result::ExceptionInfo;
pub use context::{CanvasPublisher, SharedLimiter, StateSink, TaskContext};
pub use error::TaskError;
pub use options::{RateLimit, TaskOptions, backoff, random_unit};
pub use peers::{Outage, Peers};
pub use registry::{Handler, Params, RegisteredTask, Registry};
