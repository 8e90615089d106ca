//! Housekeeping: visibility leases renewed, expired ones of dead consumers restored, parked ETA tasks brought
//! back, queue lengths read; and the health probe that turns `/health` red as soon as the broker stops
//! answering.

use super::*;

/// Lease renewal, visibility restore, queue-length gauges.
pub(super) async fn housekeeping(shared: Arc<Shared>, stop: CancellationToken) {
    let vt = shared.settings.visibility_timeout;
    let renew_every = (vt / 4).max(Duration::from_millis(500));
    let sweep_every = (vt / 2).clamp(Duration::from_secs(1), Duration::from_secs(60));
    let mut renew = tokio::time::interval(renew_every);
    let mut sweep = tokio::time::interval(sweep_every);
    let mut lengths = tokio::time::interval(Duration::from_secs(5));
    let mut unpark = tokio::time::interval(Duration::from_millis(500));
    unpark.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = renew.tick() => {
                let tags: Vec<String> = shared.slots.held.lock().expect("held").iter().cloned().collect();
                if let Err(e) = shared.broker.renew(&tags).await {
                    warn!(error = %e, "renewing visibility leases failed");
                }
            }
            _ = sweep.tick() => {
                if let Err(e) = shared.broker.restore_visible().await {
                    warn!(error = %e, "visibility-timeout sweep failed");
                }
            }
            _ = unpark.tick() => {
                // Parked ETA tasks due within the horizon come back; the last stretch waits in memory.
                let lookahead = shared.settings.eta_horizon.min(Duration::from_secs(1));
                let by = chrono::Utc::now() + chrono::Duration::from_std(lookahead).unwrap_or_default();
                match shared.broker.unpark_due(&shared.current_queues(), by).await {
                    Ok(0) => {}
                    Ok(n) => debug!(n, "republished parked ETA tasks"),
                    Err(e) => warn!(error = %e, "republishing parked ETA tasks failed"),
                }
            }
            _ = lengths.tick() => {
                for q in &shared.current_queues() {
                    match shared.broker.queue_length(q).await {
                        Ok(n) => { shared.metrics.queue_length.get_or_create(&QueueLabels { queue_name: q.clone() }).set(n as i64); }
                        Err(e) => warn!(error = %e, queue = %q, "reading queue length failed"),
                    }
                }
            }
        }
    }
}

/// Proves the broker connection twice a second when nothing else has: a ping that fails, or that a
/// reconnecting client holds for over half a second, marks the broker down (`/health` answers 503 naming it)
/// at once, rather than after `max_silence` with a fetch or a ping stuck in the client's reconnect.
pub(super) async fn health_probe(shared: Arc<Shared>, stop: CancellationToken) {
    const EVERY: Duration = Duration::from_millis(500);
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        if shared.health.silence() < EVERY {
            continue;
        }
        match tokio::time::timeout(EVERY, shared.broker.ping()).await {
            Ok(Ok(())) => shared.health.contact(),
            _ => shared.health.lost(),
        }
    }
}
