//! Running one task: the call through the layer chain (`layers`), then its outcome turned into what Celery
//! stores (callbacks and chain steps published first) and handed to the committer.

use super::*;

/// The span of one task: every log line written while it runs carries its id, its name, when it takes one
/// its tenant, and when it is traced its trace id (`--log-format json` writes them as fields of each line,
/// for Loki and friends).
pub(super) fn task_span(job: &Job) -> tracing::Span {
    let span = tracing::info_span!(
        "task",
        task_id = %job.message.id(),
        task_name = %job.message.task(),
        tenant_id = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    if let Some(tenant) = job.message.kwargs.get("tenant_id").and_then(Value::as_str) {
        span.record("tenant_id", tenant);
    }
    span
}

/// Runs one job through the [`layers::CHAIN`] and settles its outcome: callbacks and chain steps published,
/// the final event, the result handed to the committer with the ack, the chord part counted. Returns the
/// state Celery reports for it.
pub(super) async fn execute(shared: &Arc<Shared>, job: Box<Job>) -> &'static str {
    let started = Instant::now();
    let name = job.message.task().to_string();
    let queue = job.held.queue.clone();
    let terminate = CancellationToken::new();
    let started_children: Arc<Mutex<Vec<Value>>> = Default::default();
    let ctx = TaskContext {
        id: job.message.id().to_string(),
        name: name.clone(),
        retries: job.message.headers.retries,
        hostname: shared.settings.hostname.clone(),
        queue: queue.clone(),
        redelivered: job.held.redelivered,
        cancel: CancellationToken::new(),
        state: Some(state_sink(shared, &job)),
        root_id: job
            .message
            .headers
            .root_id
            .clone()
            .unwrap_or_else(|| job.message.id().to_string()),
        canvas: Some(Arc::clone(&shared.task_canvas)),
        peers: Arc::clone(&shared.settings.peers),
        limiter: Some(Arc::clone(&shared.task_limiter)),
        children: Arc::clone(&started_children),
    };
    // The message stays whole: a retry republishes it as decoded, whatever the transport.
    let (args, kwargs) = (job.message.args.clone(), job.message.kwargs.clone());
    let extended = shared
        .settings
        .result_extended
        .then(|| (args.clone(), kwargs.clone()));
    let call = layers::Call {
        ctx,
        args,
        kwargs,
        limits: time_limits(shared, &job),
        terminate: terminate.clone(),
    };
    let outcome = layers::CHAIN.call(shared, &job, call).await;
    let runtime = started.elapsed().as_secs_f64();
    if terminate.is_cancelled() {
        // `revoke(terminate=True)`: REVOKED "terminated", the slot freed, the message acked.
        let what = TaskTelemetry::Revoked {
            id: job.message.id(),
            how: Revocation::Terminated,
        };
        shared.emit(what, &name, &queue);
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
        return "REVOKED";
    }
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
    // Only a chord's header task has a part to count (and its value to keep until then).
    let in_chord = job.message.embed.chord.is_some() && job.message.headers.group.is_some();
    let mut chord_part = None;
    let state = match &outcome {
        Ok(_) => "SUCCESS",
        Err(TaskError::Failed(_)) => "FAILURE",
        Err(TaskError::Retry { .. }) => "RETRY",
        Err(TaskError::Ignore) => "IGNORED",
        Err(TaskError::Reject { .. }) => "REJECTED",
    };
    let meta = match outcome {
        Ok(value) => {
            let what = TaskTelemetry::Succeeded {
                id: &id,
                result: &value,
                runtime,
            };
            shared.emit(what, &name, &queue);
            let mut children = std::mem::take(&mut *started_children.lock().expect("children"));
            children.append(&mut published);
            if in_chord {
                chord_part = Some(("SUCCESS", value.clone()));
            }
            store.then(|| {
                let mut m = shared.meta(&job, State::Success, value, extended);
                m.children = Some(children);
                m
            })
        }
        Err(TaskError::Failed(exc)) => {
            let what = TaskTelemetry::Failed {
                id: &id,
                exc: &exc,
                runtime,
            };
            shared.emit(what, &name, &queue);
            if in_chord {
                chord_part = Some(("FAILURE", json!(exc)));
            }
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
            let what = TaskTelemetry::Retried {
                id: &id,
                exc: exc.as_ref(),
                countdown,
            };
            shared.emit(what, &name, &queue);
            let result = exc.as_ref().map(|e| json!(e)).unwrap_or(Value::Null);
            let mut m = shared.meta(&job, State::Retry, result, None);
            m.traceback = exc.as_ref().map(|e| e.traceback(&name));
            m.children = Some(vec![json!([[id, null], null])]);
            Some(m)
        }
        Err(TaskError::Ignore) => None,
        Err(TaskError::Reject { requeue, reason }) => {
            let what = TaskTelemetry::Rejected {
                id: &id,
                requeue,
                reason: &reason,
            };
            shared.emit(what, &name, &queue);
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
                return "REJECTED";
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
    if let Some((part, result)) = chord_part {
        canvas_flow::chord_part_return(shared, &job, part, &result).await;
    }
    state
}

/// The job's `(hard, soft)` limits: the message's `timelimit` header, then those set at runtime
/// (`time_limit`), then the task's options, then the worker's settings; zero means none.
fn time_limits(shared: &Shared, job: &Job) -> TimeLimits {
    let opts = &job.task.options;
    let (h_hard, h_soft) = job.message.headers.time_limits();
    let (c_hard, c_soft) = shared
        .time_limits
        .read()
        .expect("time_limits")
        .get(job.message.task())
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
    (hard, soft)
}

/// `update_state` for one job: custom states go through the committer, in order with the final result.
pub(super) fn state_sink(shared: &Arc<Shared>, job: &Job) -> celeriac_task::StateSink {
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
pub(super) async fn with_time_limits<F>(
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
pub(super) fn autoretry(job: &Job, outcome: Result<Value, TaskError>) -> Result<Value, TaskError> {
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

pub(super) fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "task panicked".into()
    }
}

pub(super) fn panicked(message: String) -> TaskError {
    TaskError::exception(
        Some("celeriac.exceptions"),
        "TaskPanicked",
        vec![Value::String(message)],
    )
}
