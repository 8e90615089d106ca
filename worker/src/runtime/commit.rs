//! The committer: result stores and acks in batches, in the order Celery writes them (early acks, results,
//! late acks), retried through broker and backend restarts; the ack flusher for acks no fetch carried.

use super::*;

/// Applies early acks the fetcher did not take within 2 ms; on stop, applies whatever is left.
pub(super) async fn ack_flusher(
    slots: Arc<Slots>,
    broker: Arc<dyn Broker>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = slots.wake_flusher.notified() => {}
            _ = stop.cancelled() => break,
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
        let acks = slots.take_acks();
        ack_all(&slots, broker.as_ref(), acks).await;
    }
    let acks = slots.take_acks();
    ack_all(&slots, broker.as_ref(), acks).await;
}

/// Batches stores and acks. Runs until every sender is gone and the channel is drained.
pub(super) async fn committer(
    slots: Arc<Slots>,
    broker: Arc<dyn Broker>,
    backend: Arc<dyn ResultBackend>,
    mut rx: mpsc::UnboundedReceiver<Commit>,
    peers: Arc<celeriac_task::Peers>,
) {
    let mut buf = Vec::with_capacity(1024);
    while rx.recv_many(&mut buf, 1024).await > 0 {
        let mut metas = Vec::new();
        let mut early = Vec::new();
        let mut late = Vec::new();
        for Commit::Done { meta, ack } in buf.drain(..) {
            let stored = meta.is_some();
            if let Some(m) = meta {
                metas.push(*m);
            }
            match ack {
                Ack::None => {}
                Ack::Early(tag) if stored => early.push(tag),
                Ack::Early(_) => {}
                Ack::Late(tag, slot) => late.push((tag, slot)),
            }
        }
        settle_early_acks(&slots, broker.as_ref(), &early).await;
        if store_all(backend.as_ref(), &metas, &peers).await {
            ack_all(&slots, broker.as_ref(), late).await;
        } else {
            // Results could not be stored: leave late-acked messages unacked so they run again.
            for (tag, slot) in late {
                slots.release(&tag, slot);
            }
        }
    }
}

/// Celery acks a message before its task runs; here the ack is queued then and applied in the fetcher's
/// next round trip. Before a result is stored its early ack must have landed, or a crash in between would
/// leave a finished task's message to be restored and run again: apply what is still queued, then wait for
/// acks in flight in a fetch (one round trip; a failed one hands them back to be applied here or by the
/// flusher).
pub(super) async fn settle_early_acks(slots: &Slots, broker: &dyn Broker, tags: &[String]) {
    if tags.is_empty() {
        return;
    }
    loop {
        if !slots.holds_any(tags) {
            if let Err(e) = broker.flush_acks().await {
                warn!(error = %e, "waiting for acks to leave failed; storing results anyway");
            }
            return;
        }
        let pending = slots.take_acks();
        if !pending.is_empty() {
            ack_all(slots, broker, pending).await;
            continue;
        }
        let applied = slots.acked.notified();
        tokio::pin!(applied);
        applied.as_mut().enable();
        if !slots.holds_any(tags) {
            continue;
        }
        tokio::select! {
            _ = applied => {}
            // Acks handed back by a failed fetch wake the flusher, not us: look again now and then.
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
}

/// Tries of one batch of results or acks: 50 ms doubling to 5 s, about five minutes in all.
pub(super) const STORE_ATTEMPTS: u32 = 66;

pub(super) async fn ack_all(slots: &Slots, broker: &dyn Broker, acks: Vec<(String, bool)>) {
    if acks.is_empty() {
        return;
    }
    let tags: Vec<String> = acks.iter().map(|(t, _)| t.clone()).collect();
    // A broker restart takes seconds: keep trying for minutes (an ack lost now is a duplicate later).
    let mut delay = Duration::from_millis(50);
    for attempt in 1..=STORE_ATTEMPTS {
        match broker.ack(&tags).await {
            Ok(()) => break,
            Err(e) if attempt < STORE_ATTEMPTS => {
                debug!(error = %e, attempt, "ack failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                error!(error = %e, count = tags.len(), "ack failed; these messages will be redelivered")
            }
        }
    }
    for (tag, slot) in acks {
        slots.release(&tag, slot);
    }
}

pub(super) async fn store_all(
    backend: &dyn ResultBackend,
    metas: &[ResultMeta],
    peers: &celeriac_task::Peers,
) -> bool {
    if metas.is_empty() {
        return true;
    }
    // A result backend restart takes seconds: keep trying for minutes (late acks wait for their results).
    let mut delay = Duration::from_millis(50);
    for attempt in 1..=STORE_ATTEMPTS {
        match backend.store(metas).await {
            Ok(_) => {
                peers.up("result_backend");
                return true;
            }
            Err(e) if attempt < STORE_ATTEMPTS => {
                peers.down("result_backend", &e.to_string());
                debug!(error = %e, attempt, "storing results failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => error!(error = %e, count = metas.len(), "storing results failed"),
        }
    }
    false
}
