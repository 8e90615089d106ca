//! `celeriac`: the command line. Parses arguments, sets up logging, resolves settings (flag, then
//! `CELERY_*` environment variable, then `--config` file, then default) and runs one subcommand.

mod apply;
mod beat;
mod call;
mod control;
mod domain;
#[cfg(any(feature = "recommend", feature = "vision"))]
mod eval;
mod families;
mod flower;
mod otel;
mod purge;
mod result;
mod settings;
#[cfg(feature = "vision")]
mod train;
mod up;
mod webhooks;
mod worker;

/// mimalloc: with glibc's allocator, malloc and free were about a third of the worker's CPU per task
/// (`make bench`: 47-53 against 31-33 µs of worker CPU per task, idle RSS unchanged).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// Celery-compatible workers and tools in Rust.
#[derive(Debug, Parser)]
#[command(name = "celeriac", version, about)]
struct Cli {
    #[command(flatten)]
    global: settings::GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a worker.
    Worker(worker::WorkerArgs),
    /// Send a task (like `celery call`); prints its id.
    Call(call::CallArgs),
    /// Run the periodic task scheduler.
    Beat(beat::BeatArgs),
    /// Apply a canvas (chain, group, chord) given as Celery signature JSON; prints the result id(s).
    Apply(apply::ApplyArgs),
    /// Ask workers (like `celery inspect`): ping, stats, active, registered, active_queues, revoked, ...
    Inspect(control::ControlArgs),
    /// Tell workers (like `celery control`): revoke, rate_limit, time_limit, pool_grow, add_consumer, shutdown, ...
    Control(control::ControlArgs),
    /// Wait for a task's result and print its meta as JSON.
    Result(result::ResultArgs),
    /// Delete all waiting messages from queues.
    Purge(purge::PurgeArgs),
    /// Serve Flower's REST API and metrics (flower-compat), with a persisted task history.
    Flower(flower::FlowerArgs),
    /// Apply the domain database's migrations (as database_admin_url): up, down N, status, fresh.
    Migrate(domain::MigrateArgs),
    /// Add and list tenants (shops).
    Tenants(domain::TenantsArgs),
    /// The email family's templates: put, get.
    Email(domain::EmailArgs),
    /// Serve the webhook endpoints peers call back (Stripe: POST /webhooks/stripe).
    Webhooks(webhooks::WebhooksArgs),
    /// Run the platform's stack natively (compose/stack.toml): start order by health, prefixed logs,
    /// restarts, one SIGTERM each on Ctrl-C.
    Up(up::UpArgs),
    /// List the services of the running stack.
    Ps(up::StateArgs),
    /// Stop the running stack and wait for it.
    Down(up::StateArgs),
    /// Train a model in Rust and write its weights (`celeriac train vision`).
    #[cfg(feature = "vision")]
    Train(train::TrainArgs),
    /// Evaluate a model: `celeriac eval recommend` (against its baselines on MovieLens-100k), `celeriac eval
    /// vision` (accuracy, model-only speed, its parameters for ONNX Runtime).
    #[cfg(any(feature = "recommend", feature = "vision"))]
    Eval(eval::EvalArgs),
}

/// Log output format.
#[derive(Debug, Clone, Copy, ValueEnum, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

fn init_logging(level: &str, format: LogFormat) -> anyhow::Result<()> {
    let level = match level.to_ascii_lowercase().as_str() {
        "debug" => "debug",
        "info" => "info",
        "warning" | "warn" => "warn",
        "error" | "critical" | "fatal" => "error",
        "trace" => "trace",
        other => anyhow::bail!(
            "--loglevel: unknown level {other:?} (use debug, info, warning, error or critical)"
        ),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("warn,celeriac={level},celeriac_worker={level},celeriac_broker={level},celeriac_backend={level},celeriac_tasks={level},celeriac_beat={level},celeriac_domain={level},celeriac_tasks_email={level},celeriac_tasks_payment={level},celeriac_tasks_vision={level},celeriac_tasks_recommend={level}")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

#[allow(clippy::exit)]
fn main() {
    let cli = Cli::parse();
    if let Err(e) = init_logging(&cli.global.loglevel, cli.global.log_format) {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let otel = match otel::init() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    };
    // A panicking task becomes a FAILURE result; log it as one line instead of a backtrace dump.
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        tracing::error!(%location, "panic: {message}");
    }));
    // CELERIAC_RUNTIME_THREADS sizes the async runtime; blocking tasks, image decoding, vector scans and the
    // model executors have their own threads either way. A worker's runtime only moves bytes (fetch, decode,
    // dispatch, store, ack), so it defaults to one thread: on 2 cores a second one cost 40% more CPU per task
    // in cross-thread wake-ups (bench/drain.py, Redis). Every other command: one thread per core.
    let threads = std::env::var("CELERIAC_RUNTIME_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .or(matches!(cli.command, Command::Worker(_)).then_some(1));
    let mut builder = match threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n.max(1));
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(async move {
        let outcome = match cli.command {
            Command::Worker(args) => worker::run(&cli.global, args).await,
            Command::Call(args) => call::run(&cli.global, args).await,
            Command::Inspect(args) | Command::Control(args) => {
                control::run(&cli.global, args).await
            }
            Command::Apply(args) => apply::run(&cli.global, args).await,
            Command::Beat(args) => beat::run(&cli.global, args).await,
            Command::Result(args) => result::run(&cli.global, args).await,
            Command::Purge(args) => purge::run(&cli.global, args).await,
            Command::Flower(args) => flower::run(&cli.global, args).await,
            Command::Migrate(args) => domain::migrate(&cli.global, args).await,
            Command::Tenants(args) => domain::tenants(&cli.global, args).await,
            Command::Email(args) => domain::email(&cli.global, args).await,
            Command::Webhooks(args) => webhooks::run(&cli.global, args).await,
            Command::Up(args) => up::up(args).await,
            Command::Ps(args) => up::ps(args).await,
            Command::Down(args) => up::down(args).await,
            #[cfg(feature = "vision")]
            Command::Train(args) => train::run(args).await,
            #[cfg(any(feature = "recommend", feature = "vision"))]
            Command::Eval(args) => eval::run(args).await,
        };
        match outcome {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e:#}");
                1
            }
        }
    });
    otel.shutdown();
    // Do not wait for blocking task threads a shutdown abandoned.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    std::process::exit(code);
}

/// A path argument helper used by several subcommands.
pub type ConfigPath = Option<PathBuf>;
