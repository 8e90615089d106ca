//! What a finished task publishes next: callbacks, chain steps, errbacks, chord bodies (Celery's
//! `_dispatch_callbacks_and_chain`, `_call_task_errbacks`, `on_chord_part_return`).

use super::*;
use celeriac_canvas::{Applied, ApplyOptions};

/// What a task uses to start canvases itself (`ctx.apply`): the worker's canvas publisher.
pub(super) struct Publisher(pub(super) celeriac_canvas::Canvas);

/// The cluster-wide limiter tasks use (`ctx.limiter`): the broker's shared token bucket.
pub(super) struct BrokerLimiter(pub(super) Arc<dyn Broker>);

impl celeriac_task::SharedLimiter for BrokerLimiter {
    fn take<'a>(
        &'a self,
        key: &'a str,
        interval: Duration,
        burst: u32,
    ) -> futures::future::BoxFuture<'a, Result<Option<Duration>, String>> {
        Box::pin(async move {
            self.0
                .take_shared_token(key, interval, burst)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

impl celeriac_task::CanvasPublisher for Publisher {
    fn apply<'a>(
        &'a self,
        sig: &'a Value,
        parent_id: &'a str,
        root_id: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<Value, String>> {
        Box::pin(async move {
            let opts = ApplyOptions {
                parent_id: Some(parent_id.to_string()),
                root_id: Some(root_id.to_string()),
                ..Default::default()
            };
            self.0
                .apply(sig, &[], opts)
                .await
                .map(|a| a.as_tuple())
                .map_err(|e| e.to_string())
        })
    }
}

fn base(job: &Job) -> ApplyOptions {
    let h = &job.message.headers;
    ApplyOptions {
        parent_id: Some(h.id.clone()),
        root_id: Some(h.root_id.clone().unwrap_or_else(|| h.id.clone())),
        ..Default::default()
    }
}

fn is_group(s: &Value) -> bool {
    s.get("subtask_type").and_then(Value::as_str) == Some("group")
}

async fn apply(
    shared: &Shared,
    sig: &Value,
    args: &[Value],
    opts: ApplyOptions,
) -> Option<Applied> {
    match shared.canvas.apply(sig, args, opts).await {
        Ok(a) => Some(a),
        Err(e) => {
            error!(error = %e, signature = %sig, "publishing a callback failed");
            None
        }
    }
}

async fn try_apply(
    shared: &Shared,
    sig: &Value,
    args: &[Value],
    opts: ApplyOptions,
) -> Result<Applied, String> {
    shared
        .canvas
        .apply(sig, args, opts)
        .await
        .map_err(|e| e.to_string())
}

/// Publishes callbacks (one: as is; several: plain ones as one group, groups separately) and the next
/// chain step, each with the result prepended. Returns the children as Celery records them, or why a
/// publish failed (the broker refused or never confirmed it): the task then fails, as in Celery.
pub(super) async fn on_success(
    shared: &Shared,
    job: &Job,
    value: &Value,
) -> Result<Vec<Value>, String> {
    let args = std::slice::from_ref(value);
    let mut children = Vec::new();
    if let Some(callbacks) = job
        .message
        .embed
        .callbacks
        .as_ref()
        .filter(|c| !c.is_empty())
    {
        if callbacks.len() == 1 {
            children.push(try_apply(shared, &callbacks[0], args, base(job)).await?);
        } else {
            let (groups, plain): (Vec<&Value>, Vec<&Value>) =
                callbacks.iter().partition(|c| is_group(c));
            for g in groups {
                children.push(try_apply(shared, g, args, base(job)).await?);
            }
            if !plain.is_empty() {
                let g = celeriac_canvas::group(plain.into_iter().cloned().collect());
                children.push(try_apply(shared, &g, args, base(job)).await?);
            }
        }
    }
    if let Some(chain) = job.message.embed.chain.as_ref().filter(|c| !c.is_empty()) {
        let mut rest = chain.clone();
        let next = rest.pop().expect("non-empty");
        let opts = ApplyOptions {
            chain: (!rest.is_empty()).then_some(rest),
            ..base(job)
        };
        children.push(try_apply(shared, &next, args, opts).await?);
    }
    Ok(children.iter().map(Applied::as_tuple).collect())
}

/// A failed task fails the rest of its chain with the same exception, then its errbacks are published as
/// one group with the failed task's id as their argument.
pub(super) async fn on_failure(shared: &Shared, job: &Job, exc: &ExceptionInfo) {
    if let Some(chain) = &job.message.embed.chain {
        for step in chain {
            if let Some(tid) = step.pointer("/options/task_id").and_then(Value::as_str) {
                fail(shared, tid, exc, job.message.task());
            }
        }
    }
    if let Some(errbacks) = job
        .message
        .embed
        .errbacks
        .as_ref()
        .filter(|e| !e.is_empty())
    {
        let g = celeriac_canvas::group(errbacks.clone());
        apply(shared, &g, &[json!(job.message.id())], base(job)).await;
    }
}

fn fail(shared: &Shared, task_id: &str, exc: &ExceptionInfo, task: &str) {
    let mut m = ResultMeta::failure(task_id, exc, Some(exc.traceback(task)));
    m.date_done = Some(time::isoformat(chrono::Utc::now()));
    let _ = shared.commit.send(Commit::Done {
        meta: Some(Box::new(m)),
        ack: Ack::None,
    });
}

/// Records a chord header task's outcome; the one call that completes the chord publishes the body with
/// the header results in order, or fails it with `ChordError` when a header task failed.
pub(super) async fn chord_part_return(shared: &Shared, job: &Job, state: &str, result: &Value) {
    let h = &job.message.headers;
    let (Some(body), Some(gid)) = (&job.message.embed.chord, &h.group) else {
        return;
    };
    let ready = match shared
        .backend
        .chord_part_return(gid, &h.id, h.group_index, state, result)
        .await
    {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => {
            error!(error = %e, group = %gid, "chord join failed");
            return;
        }
    };
    let body_id = body
        .pointer("/options/task_id")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let failed = ready
        .results
        .iter()
        .find(|(_, st, _)| st == "FAILURE" || st == "REVOKED");
    if let Some((tid, _, r)) = failed {
        let repr = serde_json::from_value::<ExceptionInfo>(r.clone())
            .map(|e| e.repr())
            .unwrap_or_else(|_| r.to_string());
        let exc = ExceptionInfo::new(
            "celery.exceptions",
            "ChordError",
            format!("Dependency {tid} raised {repr}"),
        );
        warn!(group = %gid, body = %body_id, "chord header failed: {}", exc.repr());
        fail(
            shared,
            &body_id,
            &exc,
            body.get("task").and_then(Value::as_str).unwrap_or_default(),
        );
        if let Some(errbacks) = body
            .pointer("/options/link_error")
            .and_then(Value::as_array)
            .filter(|e| !e.is_empty())
        {
            let g = celeriac_canvas::group(errbacks.clone());
            apply(shared, &g, &[json!(body_id)], base(job)).await;
        }
        if let Err(e) = shared.backend.chord_finish(gid, &ready.token, true).await {
            warn!(error = %e, group = %gid, "chord cleanup failed");
        }
        return;
    }
    let values: Vec<Value> = ready.results.into_iter().map(|(_, _, r)| r).collect();
    apply(shared, body, &[Value::Array(values)], base(job)).await;
    if let Err(e) = shared.backend.chord_finish(gid, &ready.token, false).await {
        warn!(error = %e, group = %gid, "chord cleanup failed");
    }
}
