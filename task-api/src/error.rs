//! Task outcomes that steer the runtime: each maps onto a Celery outcome.

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
    /// `self.retry(...)`: the task is republished (same id, `retries + 1`, an ETA) and RETRY is stored, or
    /// FAILURE when `max_retries` is exceeded.
    #[error("retry requested")]
    Retry {
        /// Seconds from now (default: the task's `default_retry_delay`).
        countdown: Option<f64>,
        /// Absolute time instead of a countdown.
        eta: Option<chrono::DateTime<chrono::Utc>>,
        /// The exception that caused the retry (stored with RETRY; re-raised when retries run out).
        exc: Option<ExceptionInfo>,
        /// Overrides the task's `max_retries` (negative: unlimited).
        max_retries: Option<i64>,
    },
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

    /// `self.retry(countdown=...)`.
    pub fn retry_in(countdown: f64) -> Self {
        Self::Retry {
            countdown: Some(countdown),
            eta: None,
            exc: None,
            max_retries: None,
        }
    }

    /// `self.retry(exc=exc, countdown=...)`.
    pub fn retry_with(exc: ExceptionInfo, countdown: Option<f64>) -> Self {
        Self::Retry {
            countdown,
            eta: None,
            exc: Some(exc),
            max_retries: None,
        }
    }

    /// `SoftTimeLimitExceeded()`, for a task that gives up when told its soft time limit passed.
    pub fn soft_time_limit_exceeded() -> Self {
        Self::exception(
            Some("celery.exceptions"),
            "SoftTimeLimitExceeded",
            Vec::new(),
        )
    }

    /// An exception of class `exc_type` in `celeriac.exceptions` (`UnknownTenant`, `ConfigurationError`,
    /// `Suppressed`, ...): Python clients see an exception of that class name.
    pub fn celeriac(exc_type: &str, message: impl Into<String>) -> Self {
        Self::Failed(ExceptionInfo::new("celeriac.exceptions", exc_type, message))
    }

    /// A retry in `countdown` seconds caused by `exc` (a peer that is down or throttling), within the task's
    /// `max_retries` unless `max_retries` says otherwise.
    pub fn transient(exc: ExceptionInfo, countdown: f64, max_retries: Option<i64>) -> Self {
        Self::Retry {
            countdown: Some(countdown),
            eta: None,
            exc: Some(exc),
            max_retries,
        }
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
