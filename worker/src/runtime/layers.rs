//! Execution as a chain of layers around the task's handler, in the spirit of tower and apalis: each layer
//! wraps the next, sees the call on its way in and the outcome on its way out. The order is written once,
//! in [`CHAIN`], outermost first:
//!
//! | layer | on the way in | on the way out |
//! | --- | --- | --- |
//! | [`Track`] | `task-started`, active gauge, `inspect active`, STARTED stored (`track_started`) | runtime metric, processed count, the task leaves `inspect active` |
//! | [`RetryPolicy`] | | `autoretry_for` turns a listed failure into a retry; a retry is republished (or fails past `max_retries`) |
//! | [`Terminate`] | | `revoke(terminate=True)` ends the call (the task is then stored REVOKED) |
//! | [`TimeLimit`] | | soft limit: the task's cancellation fires; hard limit: `TimeLimitExceeded` |
//! | [`CatchPanic`] | | a panic becomes `TaskPanicked`; the worker and the other tasks carry on |
//! | [`Invoke`] | arguments bound to the task's parameters | the handler's result (async, or on the blocking pool) |
//!
//! Around the chain: the rate limit runs before it, in the dispatcher (a task waiting for its turn holds no
//! concurrency slot), and `execute` settles its outcome after it (callbacks and chain steps published, the
//! final event, the result stored, the message acked, the chord part counted).
//!
//! Layers are zero-sized and composed statically: the chain costs no allocation per task.

use super::*;
use std::future::Future;

/// One call on its way through the chain.
pub(super) struct Call {
    /// What the handler is given.
    pub(super) ctx: TaskContext,
    /// The message's positional and keyword arguments (bound by [`Invoke`]).
    pub(super) args: Vec<Value>,
    pub(super) kwargs: Map<String, Value>,
    /// `(hard, soft)` time limits in seconds, already resolved.
    pub(super) limits: TimeLimits,
    /// Fired by `revoke(terminate=True)`.
    pub(super) terminate: CancellationToken,
}

/// What a task call comes to.
pub(super) type Outcome = Result<Value, TaskError>;

/// One stage of the chain: runs `call` (through the layers it wraps) for `job`.
pub(super) trait Layer: Send + Sync {
    fn call(
        &self,
        shared: &Arc<Shared>,
        job: &Job,
        call: Call,
    ) -> impl Future<Output = Outcome> + Send;
}

/// The chain every task runs through, outermost first.
pub(super) const CHAIN: Track<RetryPolicy<Terminate<TimeLimit<CatchPanic<Invoke>>>>> =
    Track(RetryPolicy(Terminate(TimeLimit(CatchPanic(Invoke)))));

/// The task as the worker and its monitors see it run.
pub(super) struct Track<L>(pub(super) L);

impl<L: Layer> Layer for Track<L> {
    async fn call(&self, shared: &Arc<Shared>, job: &Job, call: Call) -> Outcome {
        use std::sync::atomic::Ordering::Relaxed;
        let started = Instant::now();
        let (name, queue) = (job.message.task(), job.held.queue.as_str());
        shared.metrics.tasks_active.inc();
        shared.events.active.fetch_add(1, Relaxed);
        let what = TaskTelemetry::Started {
            id: job.message.id(),
        };
        shared.emit(what, name, queue);
        shared.unwait(job.message.id());
        shared.running.lock().expect("running").insert(
            job.message.id().to_string(),
            pidbox::running_from(job, call.terminate.clone()),
        );
        let opts = &job.task.options;
        if opts.track_started.unwrap_or(shared.settings.track_started) {
            let info = json!({"pid": crate::pid(), "hostname": shared.settings.hostname});
            let meta = shared.meta(job, State::Started, info, None);
            // STARTED follows the early ack too: Celery acks before the task runs.
            let ack = match Ack::of(job) {
                Ack::Late(..) => Ack::None,
                early => early,
            };
            let _ = shared.commit.send(Commit::Done {
                meta: Some(Box::new(meta)),
                ack,
            });
        }
        let outcome = self.0.call(shared, job, call).await;
        shared.metrics.tasks_active.dec();
        shared.events.active.fetch_sub(1, Relaxed);
        shared
            .running
            .lock()
            .expect("running")
            .remove(job.message.id());
        shared.events.processed.fetch_add(1, Relaxed);
        shared
            .metrics
            .runtime(name, queue, started.elapsed().as_secs_f64());
        outcome
    }
}

/// `autoretry_for` and `Task.retry`.
pub(super) struct RetryPolicy<L>(pub(super) L);

impl<L: Layer> Layer for RetryPolicy<L> {
    async fn call(&self, shared: &Arc<Shared>, job: &Job, call: Call) -> Outcome {
        let outcome = self.0.call(shared, job, call).await;
        match autoretry(job, outcome) {
            Err(TaskError::Retry {
                countdown,
                eta,
                exc,
                max_retries,
            }) => retry(shared, job, countdown, eta, exc, max_retries).await,
            other => other,
        }
    }
}

/// `revoke(terminate=True)` while the task runs: the task's cancellation fires and the call ends at once.
pub(super) struct Terminate<L>(pub(super) L);

impl<L: Layer> Layer for Terminate<L> {
    async fn call(&self, shared: &Arc<Shared>, job: &Job, call: Call) -> Outcome {
        let terminate = call.terminate.clone();
        let cancel = call.ctx.cancel.clone();
        tokio::select! {
            r = self.0.call(shared, job, call) => r,
            _ = terminate.cancelled() => {
                cancel.cancel();
                Err(TaskError::Ignore)
            }
        }
    }
}

/// The soft and hard time limits.
pub(super) struct TimeLimit<L>(pub(super) L);

impl<L: Layer> Layer for TimeLimit<L> {
    async fn call(&self, shared: &Arc<Shared>, job: &Job, call: Call) -> Outcome {
        let (hard, soft) = call.limits;
        let cancel = call.ctx.cancel.clone();
        with_time_limits(self.0.call(shared, job, call), hard, soft, &cancel).await
    }
}

/// A panicking task fails alone.
pub(super) struct CatchPanic<L>(pub(super) L);

impl<L: Layer> Layer for CatchPanic<L> {
    async fn call(&self, shared: &Arc<Shared>, job: &Job, call: Call) -> Outcome {
        AssertUnwindSafe(self.0.call(shared, job, call))
            .catch_unwind()
            .await
            .unwrap_or_else(|p| Err(panicked(panic_message(p))))
    }
}

/// Binds the arguments and runs the handler: async handlers on the runtime, blocking ones on the blocking
/// pool (a panic there is carried back to [`CatchPanic`]).
pub(super) struct Invoke;

impl Layer for Invoke {
    async fn call(&self, _shared: &Arc<Shared>, job: &Job, call: Call) -> Outcome {
        let bound = job.task.bind(call.args, call.kwargs)?;
        match &job.task.handler {
            Handler::Async(h) => h(call.ctx, bound).await,
            Handler::Blocking(h) => {
                let h = Arc::clone(h);
                let span = tracing::Span::current();
                let ctx = call.ctx;
                match tokio::task::spawn_blocking(move || span.in_scope(|| h(ctx, bound))).await {
                    Ok(r) => r,
                    Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                    Err(e) => Err(panicked(e.to_string())),
                }
            }
        }
    }
}
