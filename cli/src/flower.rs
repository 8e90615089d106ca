//! `celeriac flower`: Flower's REST API (flower-compat) over this deployment's broker and result backend,
//! with the task history in SQLite or PostgreSQL. Options follow Flower's names where Flower has one.

use crate::settings::GlobalArgs;
use anyhow::Context;
use celeriac_flower::FlowerSettings;
use clap::Args;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// `celeriac flower` options.
#[derive(Debug, Args)]
pub struct FlowerArgs {
    /// Port to listen on (Flower's `--port`).
    #[arg(long, default_value_t = 5555)]
    pub port: u16,
    /// Address to listen on (Flower's `--address`).
    #[arg(long, default_value = "127.0.0.1")]
    pub address: String,
    /// Basic auth `user:password`, several separated by commas (Flower's `--basic-auth`).
    #[arg(long = "basic-auth", env = "FLOWER_BASIC_AUTH")]
    pub basic_auth: Option<String>,
    /// Serve the API without authentication (Flower's `FLOWER_UNAUTHENTICATED_API`).
    #[arg(long, env = "FLOWER_UNAUTHENTICATED_API")]
    pub unauthenticated_api: Option<String>,
    /// Refuse every request that changes something (Flower's `--read-only`).
    #[arg(long = "read-only")]
    pub read_only: bool,
    /// Task history database: `sqlite://path?mode=rwc` (default) or `postgres://...`.
    #[arg(
        long,
        env = "CELERIAC_FLOWER_DB",
        default_value = "sqlite://celeriac-flower.db?mode=rwc"
    )]
    pub db: String,
    /// PostgreSQL schema for the task history.
    #[arg(long)]
    pub db_schema: Option<String>,
    /// Keep at most this many tasks (Flower's `--max-tasks`).
    #[arg(long = "max-tasks", default_value_t = 100_000)]
    pub max_tasks: u64,
    /// Drop tasks whose last event is older than this many seconds (0: keep).
    #[arg(long = "max-age", default_value_t = 0)]
    pub max_age: u64,
    /// Leave the worker label off task metrics (one series per task, not per task and worker).
    #[arg(long)]
    pub metrics_without_worker_label: bool,
    /// Seconds to wait for worker replies (Flower's `--inspect-timeout`, in seconds here).
    #[arg(long = "inspect-timeout", default_value_t = 1.0)]
    pub inspect_timeout: f64,
    /// Seconds between retention runs (`--max-tasks`, `--max-age`).
    #[arg(long = "prune-interval", default_value_t = 60.0)]
    pub prune_interval: f64,
}

fn truthy(v: &str) -> bool {
    matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
}

/// Runs until SIGTERM/SIGINT.
pub async fn run(global: &GlobalArgs, args: FlowerArgs) -> anyhow::Result<i32> {
    let resolved = global.resolve()?;
    let address: SocketAddr = format!("{}:{}", args.address, args.port)
        .parse()
        .with_context(|| format!("invalid --address/--port {}:{}", args.address, args.port))?;
    let basic_auth = args
        .basic_auth
        .as_deref()
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|pair| {
            pair.split_once(':')
                .map(|(u, p)| (u.to_string(), p.to_string()))
                .with_context(|| format!("--basic-auth: {pair:?} is not user:password"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let settings = FlowerSettings {
        address,
        basic_auth,
        unauthenticated_api: args.unauthenticated_api.as_deref().is_some_and(truthy),
        read_only: args.read_only,
        db_url: args.db.clone(),
        db_schema: args.db_schema.clone(),
        max_tasks: args.max_tasks,
        max_age: (args.max_age > 0).then(|| Duration::from_secs(args.max_age)),
        metrics_worker_label: !args.metrics_without_worker_label,
        inspect_timeout: Duration::from_secs_f64(args.inspect_timeout.max(0.05)),
        prune_interval: Duration::from_secs_f64(args.prune_interval.max(0.1)),
        default_queues: std::iter::once(resolved.config.task_default_queue.clone())
            .chain(resolved.config.task_queues.keys().cloned())
            .collect(),
    };
    let broker = resolved.broker().await?;
    let backend = resolved.backend().await?;
    let canvas = resolved.canvas().await?;
    let shutdown = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let stop = shutdown.clone();
    let signals = tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        stop.cancel();
    });
    let result = celeriac_flower::run(settings, broker, backend, canvas, shutdown).await;
    signals.abort();
    result.map_err(anyhow::Error::from)?;
    Ok(0)
}
