//! `celeriac worker`: builds the registry and settings, installs the signal handlers (first signal warm,
//! second cold) and runs the worker library.

use crate::settings::{GlobalArgs, split_queues};
use anyhow::Context;
use celeriac_worker::{Registry, Shutdown, WorkerSettings};
use clap::Args;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{SignalKind, signal};
use tracing::warn;

/// `celeriac worker` options (named as `celery worker`'s).
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Queues to consume, in priority order (`realtime,bulk`: realtime is served first).
    #[arg(short = 'Q', long)]
    pub queues: Option<String>,
    /// Concurrent tasks (default: number of cores).
    #[arg(short = 'c', long)]
    pub concurrency: Option<usize>,
    /// Node name; `%h` is the host name, `%n` its first label, `%d` the domain.
    #[arg(short = 'n', long, default_value = "celery@%h")]
    pub hostname: String,
    /// Prefetch multiplier (prefetch = concurrency × this).
    #[arg(long)]
    pub prefetch_multiplier: Option<usize>,
    /// Address for /metrics and /health (e.g. 127.0.0.1:9091).
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Seconds a warm shutdown waits for running tasks.
    #[arg(long)]
    pub shutdown_timeout: Option<f64>,
    /// Do not register the built-in bench.* tasks.
    #[arg(long)]
    pub without_bench_tasks: bool,
    /// Send task events (for Flower, `celery events`, celery-exporter).
    #[arg(short = 'E', long = "task-events")]
    pub task_events: bool,
    /// Send no worker heartbeats or online/offline events.
    #[arg(long)]
    pub without_heartbeat: bool,
}

/// Expands `%h`, `%n`, `%d` in a node name as Celery does.
pub fn expand_hostname(pattern: &str) -> String {
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    let (short, domain) = host.split_once('.').unwrap_or((&host, ""));
    pattern
        .replace("%h", &host)
        .replace("%n", short)
        .replace("%d", domain)
}

/// Runs the worker until a signal stops it.
pub async fn run(global: &GlobalArgs, args: WorkerArgs) -> anyhow::Result<i32> {
    let resolved = global.resolve()?;
    let cfg = &resolved.config;
    let queues = match &args.queues {
        Some(q) => split_queues(q),
        None => vec![cfg.task_default_queue.clone()],
    };
    anyhow::ensure!(!queues.is_empty(), "-Q: no queue names given");
    let concurrency = args
        .concurrency
        .or(cfg.worker_concurrency)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });
    anyhow::ensure!(concurrency > 0, "-c/--concurrency must be at least 1");
    let prefetch_multiplier = args
        .prefetch_multiplier
        .unwrap_or(cfg.worker_prefetch_multiplier);
    anyhow::ensure!(
        prefetch_multiplier > 0,
        "--prefetch-multiplier must be at least 1"
    );
    // Every outside peer's health, shared by the runtime (broker, results) and the families (their peers).
    let peers = Arc::new(celeriac_worker::task::Peers::new());
    let settings = WorkerSettings {
        hostname: expand_hostname(&args.hostname),
        queues,
        concurrency,
        prefetch_multiplier,
        acks_late: cfg.task_acks_late,
        reject_on_worker_lost: cfg.task_reject_on_worker_lost,
        ignore_result: cfg.task_ignore_result,
        result_extended: cfg.result_extended,
        visibility_timeout: Duration::from_secs_f64(
            cfg.broker_transport_options.visibility_timeout,
        ),
        shutdown_timeout: Duration::from_secs_f64(
            args.shutdown_timeout.unwrap_or(cfg.worker_shutdown_timeout),
        ),
        metrics_addr: args.metrics_addr,
        time_limit: cfg.task_time_limit,
        soft_time_limit: cfg.task_soft_time_limit,
        track_started: cfg.task_track_started,
        acks_on_failure_or_timeout: cfg.task_acks_on_failure_or_timeout,
        // ETA tasks held in memory must be due well within the visibility timeout.
        eta_horizon: Duration::from_secs_f64(
            cfg.worker_eta_horizon
                .max(0.0)
                .min(cfg.broker_transport_options.visibility_timeout / 2.0),
        ),
        eta_max_in_memory: cfg.worker_eta_max_in_memory,
        default_queue: cfg.task_default_queue.clone(),
        routes: resolved.routes(),
        send_task_events: args.task_events || cfg.worker_send_task_events,
        send_sent_event: cfg.task_send_sent_event,
        heartbeat: !args.without_heartbeat,
        peers: Arc::clone(&peers),
        release_startup_pages: cfg.worker_release_startup_pages,
    };
    let mut registry = Registry::new();
    if cfg.worker_bench_tasks && !args.without_bench_tasks {
        celeriac_tasks::bench::register(&mut registry);
    }
    let mut platform = crate::families::platform(&resolved, Arc::clone(&peers)).await?;
    crate::families::register_all(&mut registry, &mut platform)?;
    for (name, a) in &cfg.task_annotations {
        registry.annotate(name, a.to_options(name).map_err(anyhow::Error::msg)?);
    }
    let mut options = resolved.broker_options();
    options.prefetch =
        u16::try_from(settings.concurrency * settings.prefetch_multiplier).unwrap_or(u16::MAX);
    options.node_name = Some(settings.hostname.clone());
    let broker = resolved.broker_with(options).await?;
    let backend = resolved.backend().await?;

    let shutdown = Shutdown::default();
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let signals = shutdown.clone();
    let signal_task = tokio::spawn(async move {
        let mut count = 0;
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            count += 1;
            if count == 1 {
                warn!(
                    "worker: Warm shutdown (stop consuming, finish running tasks); send again to stop at once"
                );
                signals.warm.cancel();
            } else {
                warn!("worker: Cold shutdown");
                signals.cold.cancel();
                break;
            }
        }
    });
    let result = celeriac_worker::run_with_metrics(
        settings,
        registry,
        platform.into_metrics(),
        broker,
        backend,
        shutdown,
    )
    .await;
    signal_task.abort();
    result?;
    Ok(0)
}
