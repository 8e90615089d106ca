//! `celeriac beat`: runs the periodic task scheduler (safe to run on several hosts at once).

use crate::settings::GlobalArgs;
use anyhow::Context;
use celeriac_beat::{BeatSettings, Source};
use celeriac_broker::url::BrokerUrl;
use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// `celeriac beat` options.
#[derive(Debug, Args)]
pub struct BeatArgs {
    /// The schedule file (TOML with `beat_schedule` entries); reloaded when it changes.
    #[arg(short = 's', long, default_value = "celeriac-beat.toml")]
    pub schedule: PathBuf,
    /// Take the schedule from this PostgreSQL database instead (tables created by migrations at start;
    /// reloaded when rows change; beats coordinate through an advisory lock there).
    #[arg(long, env = "CELERIAC_BEAT_DATABASE")]
    pub database: Option<String>,
    /// PostgreSQL schema for the schedule tables.
    #[arg(long, default_value = "public")]
    pub database_schema: String,
    /// Seconds a leader holds its lease; a dead leader is replaced within this.
    #[arg(long, default_value_t = 15.0)]
    pub lease: f64,
    /// Address for /metrics.
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Redis for beat's leader lease and last-run state (default: the broker when it is Redis, else the
    /// result backend when it is Redis).
    #[arg(long, env = "CELERIAC_BEAT_STATE")]
    pub state_redis: Option<String>,
}

/// Runs until SIGTERM/SIGINT.
pub async fn run(global: &GlobalArgs, args: BeatArgs) -> anyhow::Result<i32> {
    let resolved = global.resolve()?;
    let state_url = args
        .state_redis
        .clone()
        .or_else(|| {
            [&resolved.broker_url, &resolved.backend_url]
                .into_iter()
                .find(|u| u.starts_with("redis") || u.starts_with("sentinel"))
                .cloned()
        })
        .context("beat keeps its leader lease and last-run state in Redis: pass --state-redis redis://host:6379/0 (the broker is not Redis and no Redis result backend is configured)")?;
    let sentinel = if state_url == resolved.backend_url && state_url != resolved.broker_url {
        resolved.backend_sentinel()
    } else {
        resolved.broker_sentinel()
    };
    let target = match BrokerUrl::parse(&state_url)? {
        BrokerUrl::Redis(_) | BrokerUrl::Sentinel(_) => {
            celeriac_broker::url::redis_target(&state_url, &sentinel)
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "beat state {}: {e}",
                        celeriac_broker::url::redact(&state_url)
                    )
                })?
        }
        BrokerUrl::Amqp(_) => anyhow::bail!("--state-redis must be a redis:// or sentinel:// URL"),
    };
    let redis = celeriac_broker::redis::connection(&target, Some(Duration::from_secs(30)))
        .await
        .context("connecting to Redis for beat state")?;
    let canvas = resolved.canvas().await?;
    anyhow::ensure!(args.lease > 0.0, "--lease must be positive");
    let source = match &args.database {
        Some(url) => {
            let mut opts = sea_orm::ConnectOptions::new(url.clone());
            opts.set_schema_search_path(args.database_schema.clone())
                .sqlx_logging(false);
            let db = sea_orm::Database::connect(opts).await.with_context(|| {
                format!(
                    "connecting to the schedule database {}",
                    celeriac_broker::url::redact(url)
                )
            })?;
            Source::Database {
                db,
                schema: args.database_schema.clone(),
            }
        }
        None => Source::File(args.schedule),
    };
    let settings = BeatSettings {
        source,
        lease: Duration::from_secs_f64(args.lease),
        redis,
        prefix: resolved
            .config
            .broker_transport_options
            .global_keyprefix
            .clone(),
        canvas,
        metrics_addr: args.metrics_addr,
    };
    let shutdown = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let stop = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        stop.cancel();
    });
    celeriac_beat::run(settings, shutdown)
        .await
        .map_err(anyhow::Error::msg)?;
    Ok(0)
}
