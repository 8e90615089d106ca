//! What a running task sees of its request, and how it talks back: custom states, cancellation, canvases it
//! starts (through whatever publishes them; the runtime supplies it).

use crate::error::TaskError;
use futures::future::BoxFuture;
use serde_json::Value;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Publishes a signature or canvas a task starts, with that task as parent (the runtime implements it over
/// its broker; the task-author API stays free of transports).
pub trait CanvasPublisher: Send + Sync {
    /// Applies `sig` with `parent_id` and `root_id`; returns Celery's result tuple of what was started, or
    /// why publishing failed.
    fn apply<'a>(
        &'a self,
        sig: &'a Value,
        parent_id: &'a str,
        root_id: &'a str,
    ) -> BoxFuture<'a, Result<Value, String>>;
}

/// A rate limiter shared by every worker (the runtime implements it over its broker): what a task uses to
/// respect a provider's limit across the cluster (an SMTP account's 50 mails/s).
pub trait SharedLimiter: Send + Sync {
    /// Takes one token from the bucket `key` (one token every `interval`, bursts of `burst`). `None`: go
    /// ahead; `Some(wait)`: try again after `wait`.
    fn take<'a>(
        &'a self,
        key: &'a str,
        interval: std::time::Duration,
        burst: u32,
    ) -> BoxFuture<'a, Result<Option<std::time::Duration>, String>>;
}

/// Stores an intermediate state (`update_state`) for the running task.
pub type StateSink = Arc<dyn Fn(&str, Value) + Send + Sync>;

/// What a running task knows about its request, and how it talks back (custom states, cancellation).
#[derive(Clone)]
pub struct TaskContext {
    /// Task id.
    pub id: String,
    /// Task name.
    pub name: String,
    /// How many times this task was retried.
    pub retries: i64,
    /// The worker's node name (`celery@host`).
    pub hostname: String,
    /// The queue the message came from.
    pub queue: String,
    /// Whether the transport delivered it before.
    pub redelivered: bool,
    /// Cancelled when the soft time limit passes (or the hard one, for blocking tasks that keep running).
    pub cancel: CancellationToken,
    /// Where `update_state` goes; `None` outside a worker.
    pub state: Option<StateSink>,
    /// The workflow's first task (this task's own id when it started the workflow).
    pub root_id: String,
    /// Publishes canvases this task starts; `None` outside a worker.
    pub canvas: Option<Arc<dyn CanvasPublisher>>,
    /// The cluster-wide rate limiter; `None` outside a worker.
    pub limiter: Option<Arc<dyn SharedLimiter>>,
    /// The outside peers' health: report a peer down (a connection error) or up (it answered).
    pub peers: Arc<crate::peers::Peers>,
    /// Result tuples of what this task started (stored as the result's `children`).
    pub children: Arc<std::sync::Mutex<Vec<Value>>>,
}

impl std::fmt::Debug for TaskContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskContext")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("retries", &self.retries)
            .finish()
    }
}

impl TaskContext {
    /// A context for calling a task outside a worker (tests).
    pub fn detached(id: &str, name: &str) -> Self {
        Self {
            id: id.into(),
            name: name.into(),
            retries: 0,
            hostname: String::new(),
            queue: String::new(),
            redelivered: false,
            cancel: CancellationToken::new(),
            state: None,
            root_id: id.into(),
            canvas: None,
            limiter: None,
            peers: Default::default(),
            children: Default::default(),
        }
    }

    /// Starts a signature or canvas from inside the task (this task is its parent; Celery's
    /// `sig.apply_async()` inside a task) and records it among the result's `children`. Returns Celery's
    /// result tuple of what was started.
    pub async fn apply(&self, sig: &Value) -> Result<Value, TaskError> {
        let canvas = self.canvas.as_ref().ok_or_else(|| {
            TaskError::builtin("RuntimeError", "no broker to publish to outside a worker")
        })?;
        let tuple = canvas
            .apply(sig, &self.id, &self.root_id)
            .await
            .map_err(|e| TaskError::builtin("RuntimeError", format!("publishing failed: {e}")))?;
        self.children.lock().expect("children").push(tuple.clone());
        Ok(tuple)
    }

    /// Starts a signature without recording it among the result's `children` (Celery's `trail=False`): for
    /// fan-outs of thousands of tasks. Returns Celery's result tuple.
    pub async fn apply_untracked(&self, sig: &Value) -> Result<Value, TaskError> {
        let canvas = self.canvas.as_ref().ok_or_else(|| {
            TaskError::builtin("RuntimeError", "no broker to publish to outside a worker")
        })?;
        canvas
            .apply(sig, &self.id, &self.root_id)
            .await
            .map_err(|e| TaskError::builtin("RuntimeError", format!("publishing failed: {e}")))
    }

    /// True once the soft time limit passed: the task should clean up and return (Celery raises
    /// `SoftTimeLimitExceeded` at this point; return [`TaskError::soft_time_limit_exceeded`] to do the same).
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Resolves when the soft time limit passes.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await
    }

    /// `self.update_state(state=..., meta=...)`: stores a custom state that Python's `AsyncResult.state` and
    /// `.info` show while the task runs.
    pub fn update_state(&self, state: &str, meta: Value) {
        if let Some(sink) = &self.state {
            sink(state, meta);
        }
    }
}
