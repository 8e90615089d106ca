//! Task outcomes that steer the runtime, and worker errors.

use celeriac_protocol::ExceptionInfo;
use serde_json::Value;
use thiserror::Error;

/// How a task ends when it does not return a value. Each maps onto a Celery outcome.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum TaskError {
    /// The task raised: FAILURE is stored with this exception, which Python re-raises.
    #[error("{}", .0.repr())]
    Failed(ExceptionInfo),
    /// `Reject(requeue)`: the message is requeued, or dropped with FAILURE `Reject` stored (Celery 5.7).
    #[error("rejected (requeue={requeue}): {reason}")]
    Reject {
        /// Put the message back at the end of its queue.
        requeue: bool,
        /// Why.
        reason: String,
    },
    /// `Ignore`: nothing is stored, the message is acknowledged.
    #[error("ignored")]
    Ignore,
}

impl TaskError {
    /// A Python exception of a builtin class, e.g. `TaskError::builtin("ValueError", "boom")`.
    pub fn builtin(exc_type: &str, message: impl Into<String>) -> Self {
        Self::Failed(ExceptionInfo::new("builtins", exc_type, message))
    }

    /// `ValueError(message)`.
    pub fn value_error(message: impl Into<String>) -> Self {
        Self::builtin("ValueError", message)
    }

    /// `TypeError(message)`.
    pub fn type_error(message: impl Into<String>) -> Self {
        Self::builtin("TypeError", message)
    }

    /// An exception with any module and class, and arbitrary args.
    pub fn exception(module: Option<&str>, exc_type: &str, args: Vec<Value>) -> Self {
        Self::Failed(ExceptionInfo {
            exc_type: exc_type.into(),
            exc_message: args,
            exc_module: module.map(str::to_string),
        })
    }
}

/// Errors that stop a worker from starting or running.
#[derive(Debug, Error)]
pub enum WorkerError {
    /// The broker failed.
    #[error(transparent)]
    Broker(#[from] celeriac_broker::BrokerError),
    /// The result backend failed.
    #[error(transparent)]
    Backend(#[from] celeriac_backend::BackendError),
    /// Configuration is invalid.
    #[error("configuration: {0}")]
    Config(String),
    /// The metrics server could not bind.
    #[error("metrics server on {addr}: {source}")]
    Metrics {
        /// Address.
        addr: String,
        /// Cause.
        source: std::io::Error,
    },
}
