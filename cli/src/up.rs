//! `celeriac up`, `celeriac ps`, `celeriac down`: the platform's stack run natively (no Docker daemon) by the
//! supervisor in `celeriac-supervisor`, from a stack file (`compose/stack.toml`).

use anyhow::Context;
use celeriac_supervisor::{Options, StateFile, Summary};
use clap::Args;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// `celeriac up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// The stack file.
    #[arg(short = 'f', long, default_value = "compose/stack.toml")]
    pub file: PathBuf,
    /// A variable for the stack file's `${name}` (repeatable): `--var python=/usr/bin/python3`.
    #[arg(long = "var", value_name = "NAME=VALUE")]
    pub vars: Vec<String>,
    /// Seconds a service may take to stop after its SIGTERM before it is SIGKILLed (above the workers'
    /// warm-shutdown timeout).
    #[arg(long, default_value_t = 75.0)]
    pub stop_timeout: f64,
    #[command(flatten)]
    pub state: StateArgs,
}

/// Where `up` writes, and `ps`/`down` read, the running stack's state.
#[derive(Debug, Args)]
pub struct StateArgs {
    /// The state file.
    #[arg(long, env = "CELERIAC_UP_STATE")]
    pub state_file: Option<PathBuf>,
}

impl StateArgs {
    fn file(&self) -> StateFile {
        let path = self.state_file.clone().unwrap_or_else(|| {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("."));
            home.join(".cache/celeriac/up/state.json")
        });
        StateFile::new(path)
    }
}

/// Runs the stack until SIGINT/SIGTERM (a second one SIGKILLs what is still stopping).
pub async fn up(args: UpArgs) -> anyhow::Result<i32> {
    let state = args.state.file();
    if let Some(running) = state.read_live() {
        anyhow::bail!(
            "a stack is already running (supervisor pid {}; `celeriac ps` lists it, `celeriac down` stops it)",
            running.pid
        );
    }
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("reading the stack file {}", args.file.display()))?;
    let mut vars = HashMap::new();
    for v in &args.vars {
        let (k, val) = v
            .split_once('=')
            .with_context(|| format!("--var {v:?}: expected NAME=VALUE"))?;
        vars.insert(k.to_string(), val.to_string());
    }
    let stack = celeriac_supervisor::Stack::parse(&text, &vars)?;
    anyhow::ensure!(args.stop_timeout > 0.0, "--stop-timeout must be positive");
    let options = Options {
        stop_timeout: Duration::from_secs_f64(args.stop_timeout),
        state: Some(state),
        ..Options::default()
    };
    let stop = CancellationToken::new();
    let force = CancellationToken::new();
    let signals = {
        let (stop, force) = (stop.clone(), force.clone());
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        tokio::spawn(async move {
            for n in 0.. {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
                if n == 0 {
                    println!(
                        "stopping: one SIGTERM to each service, waiting for warm shutdowns (again: SIGKILL)"
                    );
                    stop.cancel();
                } else {
                    force.cancel();
                    return;
                }
            }
        })
    };
    let summary: Summary = celeriac_supervisor::run(stack, options, stop, force).await?;
    signals.abort();
    match summary.failed {
        Some(why) => {
            eprintln!("the stack stopped: {why}");
            Ok(1)
        }
        None => Ok(0),
    }
}

/// `celeriac ps`: the running stack's services and their phases.
pub async fn ps(args: StateArgs) -> anyhow::Result<i32> {
    let Some(state) = args.file().read_live() else {
        println!("no stack is running");
        return Ok(1);
    };
    println!("supervisor pid {}", state.pid);
    let width = state
        .services
        .iter()
        .map(|(n, _)| n.len())
        .max()
        .unwrap_or(7)
        .max(7);
    println!("{:<width$}  phase", "service");
    for (name, phase) in &state.services {
        println!("{name:<width$}  {phase}");
    }
    Ok(0)
}

/// `celeriac down`: stops the running stack (one SIGTERM to its supervisor) and waits for it.
pub async fn down(args: StateArgs) -> anyhow::Result<i32> {
    match args.file().stop(Duration::from_secs(120)).await {
        Ok(true) => {
            println!("stopped");
            Ok(0)
        }
        Ok(false) => {
            println!("no stack is running");
            Ok(0)
        }
        Err(e) => anyhow::bail!(e),
    }
}
