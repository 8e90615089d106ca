//! celeriac beat: sends periodic tasks exactly as celery beat 5.7 does (Python and celeriac workers both run
//! them), from a TOML schedule reloaded while running. Any number of beats can run: a leader lease in Redis
//! decides who sends, and each (entry, slot) is claimed atomically before it is published, so a slot is sent
//! at most once even during a failover; the last slot of each entry is persisted, so a restart neither
//! re-sends nor skips.
//!
//! # Layout
//! - [`crontab`], [`solar`], [`schedule`]: schedule kinds and when they are due (DST-correct).
//! - [`config`]: the schedule file.
//! - [`store`]: the [`store::BeatStore`] abstraction and its Redis implementation.
//! - [`db`]: the schedule and beat state in PostgreSQL (sea-orm).
//! - [`scheduler`]: the tick: lead, find due slots, claim, publish.
//! - [`metrics`]: the `/metrics` endpoint.

pub mod config;
pub mod crontab;
pub mod db;
pub mod metrics;
pub mod schedule;
pub mod scheduler;
pub mod solar;
pub mod store;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

mod sea_orm_migration_reexport {
    pub use celeriac_migrations::MigratorTraitReexport as MigratorTrait;
}
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Where the schedule lives.
pub enum Source {
    /// A TOML file, reloaded when it changes; beats coordinate through Redis.
    File(PathBuf),
    /// The periodic-task tables of a database, reloaded when rows change; beats coordinate there.
    Database {
        /// The connection (its search path set to `schema`).
        db: sea_orm::DatabaseConnection,
        /// The schema holding the tables (names the leader lock).
        schema: String,
    },
}

/// Everything `celeriac beat` needs.
pub struct BeatSettings {
    /// The schedule.
    pub source: Source,
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

fn load_file(path: &PathBuf) -> Result<(config::Loaded, Option<SystemTime>), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let loaded =
        config::ScheduleFile::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    Ok((loaded, mtime))
}

/// The current schedule and a version that changes when it does.
async fn load(source: &Source) -> Result<(config::Loaded, String), String> {
    match source {
        Source::File(path) => {
            let (loaded, mtime) = load_file(path)?;
            Ok((loaded, format!("{mtime:?}")))
        }
        Source::Database { db, .. } => {
            let (loaded, problems) = db::load(db, schedule::CatchUp::Once)
                .await
                .map_err(|e| e.to_string())?;
            for p in problems {
                warn!("{p}");
            }
            Ok((loaded, version(source).await?))
        }
    }
}

async fn version(source: &Source) -> Result<String, String> {
    match source {
        Source::File(path) => Ok(format!(
            "{:?}",
            std::fs::metadata(path).and_then(|m| m.modified()).ok()
        )),
        Source::Database { db, .. } => db::fingerprint(db).await.map_err(|e| e.to_string()),
    }
}

/// Runs a beat until `shutdown`.
pub async fn run(settings: BeatSettings, shutdown: CancellationToken) -> Result<(), String> {
    if let Source::Database { db, .. } = &settings.source {
        use celeriac_migrations::Migrator;
        use sea_orm_migration_reexport::MigratorTrait;
        Migrator::up(db, None)
            .await
            .map_err(|e| format!("migrating the schedule database: {e}"))?;
    }
    let (loaded, mut seen) = load(&settings.source).await?;
    info!(entries = loaded.entries.len(), "beat schedule loaded");
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
    let store: std::sync::Arc<dyn store::BeatStore> = match &settings.source {
        Source::File(_) => std::sync::Arc::new(store::Store::new(settings.redis, &settings.prefix)),
        Source::Database { db, schema } => {
            std::sync::Arc::new(db::DbStore::new(db.clone(), schema))
        }
    };
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
        match version(&settings.source).await {
            Ok(v) if v != seen => match load(&settings.source).await {
                Ok((loaded, v)) => {
                    info!(entries = loaded.entries.len(), "beat schedule reloaded");
                    beat.set_schedule(loaded);
                    seen = v;
                }
                Err(e) => {
                    error!(error = %e, "schedule reload failed; keeping the previous schedule");
                    seen = v;
                }
            },
            Ok(_) => {}
            Err(e) => warn!(error = %e, "checking the schedule for changes failed"),
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
