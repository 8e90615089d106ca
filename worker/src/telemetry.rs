//! One telemetry type for what happens to a task: [`TaskTelemetry::emit`] bumps the Prometheus counter,
//! sends the Celery event (when task events are on) and writes the log line together, so the three never
//! disagree and a new outcome cannot forget one of them.

use crate::events::Events;
use crate::metrics::{Metrics, TaskEvent};
use celeriac_protocol::TaskMessage;
use celeriac_protocol::event::EventKind;
use celeriac_protocol::result::ExceptionInfo;
use serde_json::{Value, json};
use tracing::{debug, error, info, warn};

/// Why a task was revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revocation {
    /// Revoked by id (or stamp) before it ran.
    Revoked,
    /// Its `expires` passed before it ran.
    Expired,
    /// `revoke(terminate=True)` stopped it while running (SIGTERM's number, as Celery reports).
    Terminated,
}

/// What happened to a task, with what its event and log line carry.
#[derive(Debug)]
pub enum TaskTelemetry<'a> {
    /// Received, and its task is registered.
    Received(&'a TaskMessage),
    /// Received, but no task of that name is registered: counted as received and failed.
    Unregistered {
        /// The message.
        message: &'a TaskMessage,
        /// `NotRegistered(name)`.
        exc: &'a ExceptionInfo,
    },
    /// Started running.
    Started {
        /// Task id.
        id: &'a str,
    },
    /// Returned a value.
    Succeeded {
        /// Task id.
        id: &'a str,
        /// The value.
        result: &'a Value,
        /// Seconds it ran.
        runtime: f64,
    },
    /// Raised.
    Failed {
        /// Task id.
        id: &'a str,
        /// The exception.
        exc: &'a ExceptionInfo,
        /// Seconds it ran.
        runtime: f64,
    },
    /// Asked to be retried (the retry was published).
    Retried {
        /// Task id.
        id: &'a str,
        /// The exception that caused it, if any.
        exc: Option<&'a ExceptionInfo>,
        /// Seconds until the retry runs, if a countdown was given.
        countdown: Option<f64>,
    },
    /// Rejected (`Reject`).
    Rejected {
        /// Task id.
        id: &'a str,
        /// Whether the message goes back to its queue.
        requeue: bool,
        /// The reason given.
        reason: &'a str,
    },
    /// Revoked.
    Revoked {
        /// Task id.
        id: &'a str,
        /// How.
        how: Revocation,
    },
}

impl TaskTelemetry<'_> {
    /// The Celery event it sends.
    pub fn kind(&self) -> EventKind {
        match self {
            TaskTelemetry::Received(_) => EventKind::TaskReceived,
            TaskTelemetry::Unregistered { .. } | TaskTelemetry::Failed { .. } => {
                EventKind::TaskFailed
            }
            TaskTelemetry::Started { .. } => EventKind::TaskStarted,
            TaskTelemetry::Succeeded { .. } => EventKind::TaskSucceeded,
            TaskTelemetry::Retried { .. } => EventKind::TaskRetried,
            TaskTelemetry::Rejected { .. } => EventKind::TaskRejected,
            TaskTelemetry::Revoked { .. } => EventKind::TaskRevoked,
        }
    }

    /// Counts it for task `name` on `queue`, sends its event and logs it.
    pub fn emit(self, metrics: &Metrics, events: &Events, name: &str, queue: &str) {
        match &self {
            TaskTelemetry::Received(_) => metrics.task(TaskEvent::Received, name, queue),
            TaskTelemetry::Unregistered { exc, .. } => {
                metrics.task(TaskEvent::Received, name, queue);
                metrics.failed(name, queue, &exc.exc_type);
            }
            TaskTelemetry::Started { .. } => metrics.task(TaskEvent::Started, name, queue),
            TaskTelemetry::Succeeded { .. } => metrics.task(TaskEvent::Succeeded, name, queue),
            TaskTelemetry::Failed { exc, .. } => metrics.failed(name, queue, &exc.exc_type),
            TaskTelemetry::Retried { .. } => metrics.task(TaskEvent::Retried, name, queue),
            TaskTelemetry::Rejected { .. } => metrics.task(TaskEvent::Rejected, name, queue),
            TaskTelemetry::Revoked { .. } => metrics.task(TaskEvent::Revoked, name, queue),
        }
        if events.task_events() {
            events.task(self.kind(), self.fields(name));
        }
        self.log(name);
    }

    /// The event's own fields, in Celery's order.
    fn fields(&self, name: &str) -> Vec<(&'static str, Value)> {
        match *self {
            TaskTelemetry::Received(message) => {
                let h = &message.headers;
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
                ]
            }
            TaskTelemetry::Unregistered { message, exc } => vec![
                ("uuid", json!(message.id())),
                ("exception", json!(exc.repr())),
                ("traceback", Value::Null),
            ],
            TaskTelemetry::Started { id } => vec![("uuid", json!(id))],
            TaskTelemetry::Succeeded {
                id,
                result,
                runtime,
            } => vec![
                ("uuid", json!(id)),
                ("result", json!(celeriac_protocol::repr::repr(result))),
                ("runtime", json!(runtime)),
            ],
            TaskTelemetry::Failed { id, exc, .. } => vec![
                ("uuid", json!(id)),
                ("exception", json!(exc.repr())),
                ("traceback", json!(exc.traceback(name))),
            ],
            TaskTelemetry::Retried { id, exc, .. } => match exc {
                Some(e) => vec![
                    ("uuid", json!(id)),
                    ("exception", json!(e.repr())),
                    ("traceback", json!(e.traceback(name))),
                ],
                None => vec![
                    ("uuid", json!(id)),
                    ("exception", json!("Retry()")),
                    ("traceback", Value::Null),
                ],
            },
            TaskTelemetry::Rejected { id, requeue, .. } => {
                vec![("uuid", json!(id)), ("requeue", json!(requeue))]
            }
            TaskTelemetry::Revoked { id, how } => vec![
                ("uuid", json!(id)),
                ("terminated", json!(how == Revocation::Terminated)),
                (
                    "signum",
                    if how == Revocation::Terminated {
                        json!(15)
                    } else {
                        Value::Null
                    },
                ),
                ("expired", json!(how == Revocation::Expired)),
            ],
        }
    }

    fn log(&self, name: &str) {
        match *self {
            TaskTelemetry::Received(message) => {
                debug!(task = %name, id = %message.id(), "Task received");
            }
            TaskTelemetry::Unregistered { message, .. } => {
                error!(task = %name, id = %message.id(), "Received unregistered task of type {name:?}; storing NotRegistered");
            }
            TaskTelemetry::Started { .. } => {}
            TaskTelemetry::Succeeded { id, runtime, .. } => {
                debug!(task = %name, %id, runtime, "Task succeeded");
            }
            TaskTelemetry::Failed { id, exc, runtime } => {
                warn!(task = %name, %id, runtime, exception = %exc.repr(), "Task raised");
            }
            TaskTelemetry::Retried { id, countdown, .. } => {
                info!(task = %name, %id, countdown, "Task retry scheduled");
            }
            TaskTelemetry::Rejected {
                id,
                requeue,
                reason,
            } => {
                info!(task = %name, %id, requeue, %reason, "Task rejected");
            }
            TaskTelemetry::Revoked { id, how } => match how {
                Revocation::Revoked => info!(task = %name, %id, "Discarding revoked task"),
                Revocation::Expired => info!(task = %name, %id, "Discarding expired task"),
                Revocation::Terminated => info!(task = %name, %id, "Task terminated"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocations_report_as_celery() {
        let fields = |how| {
            TaskTelemetry::Revoked { id: "t", how }
                .fields("x")
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect::<serde_json::Map<_, _>>()
        };
        assert_eq!(
            Value::Object(fields(Revocation::Terminated)),
            json!({"uuid": "t", "terminated": true, "signum": 15, "expired": false})
        );
        assert_eq!(
            Value::Object(fields(Revocation::Expired)),
            json!({"uuid": "t", "terminated": false, "signum": null, "expired": true})
        );
        assert_eq!(
            TaskTelemetry::Revoked {
                id: "t",
                how: Revocation::Revoked
            }
            .kind(),
            EventKind::TaskRevoked
        );
    }

    #[test]
    fn a_retry_without_an_exception_reports_retry() {
        let f = TaskTelemetry::Retried {
            id: "t",
            exc: None,
            countdown: Some(2.0),
        }
        .fields("x");
        assert_eq!(f[1], ("exception", json!("Retry()")));
        assert_eq!(f[2], ("traceback", Value::Null));
    }
}
