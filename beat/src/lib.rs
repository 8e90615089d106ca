//! celeriac beat: sends periodic tasks exactly as celery beat 5.7 does (Python and celeriac workers both run
//! them), from a TOML schedule reloaded while running. Any number of beats can run: a leader lease in Redis
//! decides who sends, and each (entry, slot) is claimed atomically before it is published, so a slot is sent
//! at most once even during a failover; the last slot of each entry is persisted, so a restart neither
//! re-sends nor skips.
//!
//! # Layout
//! - [`crontab`], [`solar`], [`schedule`]: schedule kinds and when they are due (DST-correct).
//! - [`config`]: the schedule file.
//! - [`store`]: leader lease and per-entry state in Redis.
//! - [`scheduler`]: the tick: lead, find due slots, claim, publish.
//! - [`metrics`]: the `/metrics` endpoint.

pub mod config;
pub mod crontab;
pub mod metrics;
pub mod schedule;
pub mod scheduler;
pub mod solar;
pub mod store;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Everything `celeriac beat` needs.
pub struct BeatSettings {
    /// The schedule file.
    pub schedule_path: PathBuf,
    /// Lease length: a dead leader is replaced within this.
    pub lease: Duration,
    /// Redis connection for beat state.
    pub redis: redis::aio::ConnectionManager,
    /// Key prefix (the broker's `global_keyprefix`).
    pub prefix: String,
    /// Publisher.
    pub canvas: celeriac_canvas::Canvas,
    /// Where `/metrics` listens.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

fn load(path: &PathBuf) -> Result<(config::Loaded, Option<SystemTime>), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let loaded =
        config::ScheduleFile::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    Ok((loaded, mtime))
}

/// Runs a beat until `shutdown`.
pub async fn run(settings: BeatSettings, shutdown: CancellationToken) -> Result<(), String> {
    let (loaded, mut mtime) = load(&settings.schedule_path)?;
    info!(entries = loaded.entries.len(), path = %settings.schedule_path.display(), "beat schedule loaded");
    let metrics = metrics::BeatMetrics::default();
    let server_stop = shutdown.clone();
    let server = match settings.metrics_addr {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("metrics on {addr}: {e}"))?;
            let app = metrics.router();
            Some(tokio::spawn(async move {
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(server_stop.cancelled_owned())
                    .await;
            }))
        }
        None => None,
    };
    let id = format!("{}@{}", uuid::Uuid::new_v4().simple(), std::process::id());
    let store = store::Store::new(settings.redis, &settings.prefix);
    let mut beat =
        scheduler::Beat::new(id, store, settings.canvas, loaded, settings.lease, metrics);
    // Tick often enough to renew the lease and notice a reload; sleep less when a slot is sooner.
    let max_sleep = (settings.lease / 3).clamp(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        let tick = beat.tick(chrono::Utc::now()).await;
        let until_next = tick
            .next
            .and_then(|n| (n - chrono::Utc::now()).to_std().ok())
            .unwrap_or(max_sleep);
        tokio::select! {
            _ = tokio::time::sleep(until_next.min(max_sleep)) => {}
            _ = shutdown.cancelled() => break,
        }
        let now_mtime = std::fs::metadata(&settings.schedule_path)
            .and_then(|m| m.modified())
            .ok();
        if now_mtime != mtime {
            match load(&settings.schedule_path) {
                Ok((loaded, m)) => {
                    info!(entries = loaded.entries.len(), "beat schedule reloaded");
                    beat.set_schedule(loaded);
                    mtime = m;
                }
                Err(e) => {
                    error!(error = %e, "schedule reload failed; keeping the previous schedule");
                    mtime = now_mtime;
                }
            }
        }
    }
    beat.resign().await;
    if let Some(s) = server
        && let Err(e) = s.await
    {
        warn!(error = %e, "metrics server task failed");
    }
    info!("beat stopped");
    Ok(())
}
