//! The fetcher: takes messages as prefetch slots free up (acks ride along), dead-letters undecodable ones,
//! answers unknown task names, holds ETA tasks in timers, and gives back what never started.

use super::*;

/// Takes messages while prefetch slots are free.
pub(super) async fn fetcher(
    shared: Arc<Shared>,
    ready: mpsc::UnboundedSender<Box<Job>>,
    warm: CancellationToken,
) {
    let mut timers: JoinSet<(Box<Job>, bool)> = JoinSet::new();
    let mut backoff = Duration::from_millis(100);
    let mut down = false;
    loop {
        while let Some(Ok((job, _))) = timers.try_join_next() {
            eta_fired(&shared, job, &ready);
        }
        let first = tokio::select! {
            biased;
            _ = warm.cancelled() => break,
            Some(Ok((job, _))) = timers.join_next(), if !timers.is_empty() => {
                eta_fired(&shared, job, &ready);
                continue;
            }
            p = tokio::time::timeout(Duration::from_secs(2), Arc::clone(&shared.slots.prefetch).acquire_owned()) => Some(p),
            _ = shared.slots.wake_fetcher.notified() => None,
        };
        if first.is_none() {
            // Woken by an ack: let the tasks being started right now queue theirs too, so one fetch
            // carries a batch of acks rather than one.
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
        }
        let acks = shared.slots.take_acks();
        let mut slots = 0;
        match first {
            Some(Ok(Ok(permit))) => {
                permit.forget();
                slots = 1;
            }
            Some(_) if acks.is_empty() => {
                // All slots busy: still prove the broker connection is alive for /health.
                if shared.broker.ping().await.is_ok() {
                    shared.health.contact();
                } else {
                    shared.health.lost();
                }
                continue;
            }
            _ => {}
        }
        if acks.is_empty() && slots == 0 {
            continue;
        }
        let freed = acks.iter().filter(|(_, slot)| *slot).count();
        while slots < 1024 {
            match shared.slots.prefetch.try_acquire() {
                Ok(p) => {
                    p.forget();
                    slots += 1;
                }
                Err(_) => break,
            }
        }
        let ack_tags: Vec<String> = acks.iter().map(|(t, _)| t.clone()).collect();
        let max = slots + freed;
        // Never cancel a fetch half-way: a popped message must reach us to be acked or given back.
        shared
            .in_fetch
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let fetched = shared
            .broker
            .fetch(
                &shared.current_queues(),
                max,
                &ack_tags,
                Duration::from_secs(1),
            )
            .await;
        let _done = FetchDone(&shared);
        match fetched {
            Ok(deliveries) => {
                backoff = Duration::from_millis(100);
                if down {
                    info!("broker connection back; consuming again");
                    down = false;
                }
                shared.health.contact();
                for (tag, _) in &acks {
                    shared.slots.forget(tag);
                }
                shared.slots.prefetch.add_permits(max - deliveries.len());
                for d in deliveries {
                    receive(&shared, d, &ready, &mut timers, &warm).await;
                }
            }
            Err(e) => {
                shared.health.lost();
                shared.slots.prefetch.add_permits(slots);
                // Not known to be applied: hand the acks back (acking twice is harmless).
                shared
                    .slots
                    .pending_acks
                    .lock()
                    .expect("pending_acks")
                    .extend(acks);
                shared.slots.wake_flusher.notify_one();
                let reconnecting = matches!(e, celeriac_broker::BrokerError::NotConnected(_));
                if reconnecting {
                    // The transport reconnects on its own and answers at once meanwhile: poll briskly so
                    // consuming resumes as soon as the connection is back.
                    backoff = backoff.min(Duration::from_millis(200));
                    if !down {
                        warn!(error = %e, "broker connection down; waiting for it to come back");
                    }
                    down = true;
                } else {
                    error!(error = %e, retry_in = ?backoff, "fetching from the broker failed");
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = warm.cancelled() => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    // Warm shutdown: ETA tasks still waiting go back to their queues.
    let mut waiting = Vec::new();
    while let Some(r) = timers.join_next().await {
        if let Ok((job, fired)) = r {
            if fired {
                let _ = ready.send(job);
            } else {
                waiting.push(job);
            }
        }
    }
    give_back(&shared, waiting).await;
}

/// Marks the end of a fetch (after its deliveries were handed on or given back) when dropped.
pub(super) struct FetchDone<'a>(&'a Shared);

impl Drop for FetchDone<'_> {
    fn drop(&mut self) {
        self.0
            .in_fetch
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self.0.fetched.send_modify(|n| *n += 1);
    }
}

pub(super) async fn receive(
    shared: &Arc<Shared>,
    d: Delivery,
    ready: &mpsc::UnboundedSender<Box<Job>>,
    timers: &mut JoinSet<(Box<Job>, bool)>,
    warm: &CancellationToken,
) {
    let Delivery { held, message } = d;
    shared.slots.hold(&held.tag);
    if !shared.queues.read().expect("queues").contains(&held.queue) {
        // Popped by a fetch that started before `cancel_consumer`: not ours any more, back to the front.
        if let Err(e) = shared.broker.requeue(&[&held], true).await {
            warn!(error = %e, queue = %held.queue, "giving back a message of a cancelled queue failed");
        }
        shared.release(&held.tag, true);
        return;
    }
    let message = match message {
        Ok(m) => m,
        Err(e) => {
            let reason = e.to_string();
            warn!(queue = %held.queue, tag = %held.tag, %reason, "undecodable message dead-lettered (celeriac.deadletter.<queue>)");
            shared.metrics.dead_lettered.inc();
            if let Err(err) = shared.broker.dead_letter(&held, &reason).await {
                error!(error = %err, tag = %held.tag, "dead-lettering failed; the message stays unacked and will be restored");
            }
            shared.release(&held.tag, true);
            return;
        }
    };
    let name = message.task().to_string();
    let Some(task) = shared.registry.get(&name).cloned() else {
        let exc = ExceptionInfo::new("celery.exceptions", "NotRegistered", name.clone());
        let what = TaskTelemetry::Unregistered {
            message: &message,
            exc: &exc,
        };
        shared.emit(what, &name, &held.queue);
        let mut meta = ResultMeta::failure(message.id(), &exc, None);
        meta.date_done = Some(time::isoformat(chrono::Utc::now()));
        meta.group_id = message.headers.group.clone();
        meta.parent_id = message.headers.parent_id.clone();
        meta.reply_to = message.properties.reply_to.clone();
        let _ = shared.commit.send(Commit::Done {
            meta: Some(Box::new(meta)),
            ack: Ack::Late(held.tag, true),
        });
        return;
    };
    shared.emit(TaskTelemetry::Received(&message), &name, &held.queue);
    let acks_late = task.options.acks_late.unwrap_or(shared.settings.acks_late);
    let now = chrono::Utc::now();
    let expired = message
        .headers
        .expires
        .as_deref()
        .and_then(time::parse_iso)
        .is_some_and(|t| t <= now);
    let mut job = Box::new(Job {
        held,
        message,
        task,
        acks_late,
        holds_slot: true,
    });
    if expired {
        revoke_expired(shared, job);
        return;
    }
    if shared.is_revoked(job.message.id()) {
        discard_revoked(shared, job);
        return;
    }
    let eta = job
        .message
        .headers
        .eta
        .as_deref()
        .and_then(time::parse_iso)
        .filter(|t| *t > now);
    match eta {
        Some(eta) => {
            let wait = (eta - now).to_std().unwrap_or_default();
            // On AMQP a held message keeps its prefetch slot at the broker (per-consumer QoS), so anything
            // not due within a second waits in RabbitMQ's delay queues instead of blocking the consumer.
            if wait > shared.settings.eta_horizon
                || timers.len() >= shared.settings.eta_max_in_memory
                || (shared.broker.holds_cost_prefetch() && wait > Duration::from_secs(1))
            {
                // Far in the future (or too many waiting): park it in the broker, out of `unacked`, so no
                // visibility timeout redelivers it and memory stays flat; any worker republishes it when due.
                match shared.broker.park(&job.held, eta).await {
                    Ok(parked) => {
                        debug!(id = %job.message.id(), %eta, parked, "ETA task parked");
                        shared.release(&job.held.tag, true);
                        return;
                    }
                    Err(e) => warn!(error = %e, "parking an ETA task failed; holding it in memory"),
                }
            }
            // Held in a timer; like Celery, an ETA task does not count against prefetch while it waits.
            job.holds_slot = false;
            shared.slots.prefetch.add_permits(1);
            shared.wait_for(&job, job.message.headers.eta.clone());
            timers.spawn(hold(job, wait, warm.clone()));
        }
        None => {
            shared.wait_for(&job, None);
            let _ = ready.send(job);
        }
    }
}

/// Holds `item` for `wait`: `(item, true)` when the time came, `(item, false)` when a warm shutdown came
/// first (the caller gives it back to the broker). Used for ETA timers and rate-limited jobs.
pub(super) async fn hold<T>(item: T, wait: Duration, warm: CancellationToken) -> (T, bool) {
    tokio::select! {
        _ = tokio::time::sleep(wait) => (item, true),
        _ = warm.cancelled() => (item, false),
    }
}

/// An ETA came due: run the task unless it expired meanwhile (Celery checks `expires` again here).
pub(super) fn eta_fired(shared: &Shared, job: Box<Job>, ready: &mpsc::UnboundedSender<Box<Job>>) {
    let expired = job
        .message
        .headers
        .expires
        .as_deref()
        .and_then(time::parse_iso)
        .is_some_and(|t| t <= chrono::Utc::now());
    if expired {
        revoke_expired(shared, job);
    } else if shared.is_revoked(job.message.id()) {
        discard_revoked(shared, job);
    } else {
        shared.wait_for(&job, None);
        let _ = ready.send(job);
    }
}

/// A revoked task seen on receipt or when its ETA fires: REVOKED (not over a SUCCESS), acked, never run.
pub(super) fn discard_revoked(shared: &Shared, job: Box<Job>) {
    shared.unwait(job.message.id());
    let what = TaskTelemetry::Revoked {
        id: job.message.id(),
        how: Revocation::Revoked,
    };
    shared.emit(what, job.message.task(), &job.held.queue);
    let meta = shared.revoked_meta(&job, "revoked");
    let _ = shared.commit.send(Commit::Done {
        meta,
        ack: Ack::Late(job.held.tag, job.holds_slot),
    });
}

pub(super) fn revoke_expired(shared: &Shared, job: Box<Job>) {
    shared.unwait(job.message.id());
    let what = TaskTelemetry::Revoked {
        id: job.message.id(),
        how: Revocation::Expired,
    };
    shared.emit(what, job.message.task(), &job.held.queue);
    let exc = ExceptionInfo::new("celery.exceptions", "TaskRevokedError", "expired");
    let meta = shared
        .store_results(&job)
        .then(|| shared.meta(&job, State::Revoked, json!(exc), None));
    let _ = shared.commit.send(Commit::Done {
        meta: meta.map(Box::new),
        ack: Ack::Late(job.held.tag, job.holds_slot),
    });
}

/// Puts never-started jobs back at the front of their queues.
#[allow(clippy::vec_box)] // jobs travel boxed through channels; unboxing here would copy them
pub(super) async fn give_back(shared: &Shared, jobs: Vec<Box<Job>>) {
    if jobs.is_empty() {
        return;
    }
    for j in &jobs {
        shared.unwait(j.message.id());
    }
    let held: Vec<&Held> = jobs.iter().map(|j| &j.held).collect();
    match shared.broker.requeue(&held, true).await {
        Ok(n) => info!(restored = n, "Restoring {n} unacknowledged message(s)"),
        Err(e) => {
            error!(error = %e, "giving back prefetched messages failed; the visibility timeout will restore them")
        }
    }
    for j in &jobs {
        shared.release(&j.held.tag, j.holds_slot);
    }
}
