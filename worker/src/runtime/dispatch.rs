//! The dispatcher: starts at most `concurrency` tasks at once (acking first unless acks_late), waits out rate
//! limits, and on warm shutdown gives back what never started and settles what it had to abandon.

use super::*;
use tracing::Instrument;

/// Starts jobs while concurrency allows.
pub(super) async fn dispatcher(
    shared: Arc<Shared>,
    mut ready: mpsc::UnboundedReceiver<Box<Job>>,
    warm: CancellationToken,
) {
    let slots = Arc::clone(&shared.concurrency);
    let mut running = JoinSet::new();
    // Rate-limited jobs waiting for their turn; they give their prefetch slot back while they wait, and at
    // most `prefetch` of one task wait in memory (the rest are parked in the broker until their turn).
    let mut delayed: JoinSet<(Box<Job>, bool)> = JoinSet::new();
    let mut waiting: HashMap<String, usize> = HashMap::new();
    let mut unstarted = Vec::new();
    loop {
        while running.try_join_next().is_some() {}
        let mut job = tokio::select! {
            biased;
            _ = warm.cancelled() => break,
            Some(Ok((job, _))) = delayed.join_next(), if !delayed.is_empty() => {
                if let Some(n) = waiting.get_mut(job.message.task()) {
                    *n = n.saturating_sub(1);
                }
                job
            }
            j = ready.recv() => match j { Some(j) => j, None => break },
        };
        if let Some(limiter) = shared.limiter(job.message.task())
            && let Some(wait) = limiter.check(shared.broker.as_ref()).await
        {
            if job.holds_slot {
                job.holds_slot = false;
                shared.slots.prefetch.add_permits(1);
            }
            let n = waiting.entry(job.message.task().to_string()).or_default();
            if *n >= shared.settings.prefetch() {
                let due = chrono::Utc::now() + chrono::Duration::from_std(wait).unwrap_or_default();
                match shared.broker.park(&job.held, due).await {
                    Ok(_) => {
                        shared.unwait(job.message.id());
                        shared.release(&job.held.tag, false);
                        continue;
                    }
                    Err(e) => {
                        warn!(error = %e, "parking a rate-limited task failed; holding it in memory")
                    }
                }
            }
            *n += 1;
            delayed.spawn(hold(job, wait, warm.clone()));
            continue;
        }
        let permit = tokio::select! {
            p = Arc::clone(&slots).acquire_owned() => p.expect("never closed"),
            _ = warm.cancelled() => {
                unstarted.push(job);
                break;
            }
        };
        if job.acks_late {
            let exc = ExceptionInfo::new(
                "billiard.exceptions",
                "WorkerLostError",
                "Worker exited prematurely: abandoned at the warm-shutdown timeout",
            );
            let late = LateJob {
                held: job.held.clone(),
                meta: shared.meta(&job, State::Failure, json!(exc), None),
                holds_slot: job.holds_slot,
                reject_on_worker_lost: job
                    .task
                    .options
                    .reject_on_worker_lost
                    .unwrap_or(shared.settings.reject_on_worker_lost),
            };
            shared
                .running_late
                .lock()
                .expect("running_late")
                .insert(job.held.tag.clone(), late);
        } else {
            shared.slots.queue_ack(job.held.tag.clone(), job.holds_slot);
        }
        let shared = Arc::clone(&shared);
        let span = task_span(&job);
        let cx = crate::trace::start(&job.message, &shared.settings.hostname, &job.held.queue);
        let headers = crate::trace::headers(&cx);
        if let Some(h) = &headers {
            // `00-<trace id>-...`: the id Tempo finds the trace by.
            span.record("trace_id", h.traceparent.get(3..35).unwrap_or_default());
        }
        running.spawn(
            async move {
                // Boxed: the task future is large, and an unboxed one is copied whole into the spawned task.
                let state =
                    celeriac_canvas::trace::scope(headers, Box::pin(execute(&shared, job))).await;
                crate::trace::finish(&cx, state);
                drop(permit);
            }
            .instrument(span),
        );
    }
    // Warm shutdown. Messages that never started go back (the fetcher closes the channel when it stops).
    while let Some(Ok((job, _))) = delayed.join_next().await {
        unstarted.push(job);
    }
    while let Some(job) = ready.recv().await {
        unstarted.push(job);
    }
    give_back(&shared, unstarted).await;
    if !running.is_empty() {
        info!(running = running.len(), timeout = ?shared.settings.shutdown_timeout, "waiting for running tasks");
    }
    let drained = tokio::time::timeout(shared.settings.shutdown_timeout, async {
        while running.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        running.abort_all();
        while running.join_next().await.is_some() {}
        let abandoned: Vec<LateJob> = shared
            .running_late
            .lock()
            .expect("running_late")
            .drain()
            .map(|(_, j)| j)
            .collect();
        warn!(
            abandoned = abandoned.len(),
            "warm-shutdown timeout: abandoning running tasks"
        );
        // As Celery treats a lost acks_late task: requeue it when task_reject_on_worker_lost, otherwise
        // fail it with WorkerLostError and ack it.
        let (requeue, fail): (Vec<LateJob>, Vec<LateJob>) =
            abandoned.into_iter().partition(|j| j.reject_on_worker_lost);
        let refs: Vec<&Held> = requeue.iter().map(|j| &j.held).collect();
        if let Err(e) = shared.broker.requeue(&refs, true).await {
            error!(error = %e, "giving back abandoned tasks failed; the visibility timeout will restore them");
        }
        for j in requeue {
            shared.release(&j.held.tag, j.holds_slot);
        }
        for j in fail {
            let _ = shared.commit.send(Commit::Done {
                meta: Some(Box::new(j.meta)),
                ack: Ack::Late(j.held.tag, j.holds_slot),
            });
        }
    }
}
