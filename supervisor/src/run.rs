//! Running a stack. Each service waits until what it depends on is ready (its health check answers) or done
//! (a one-shot that exited 0), runs in a process group of its own with every output line prefixed by its name,
//! and is restarted with backoff when it exits (1 s doubling to 30 s; back to 1 s after a minute of health).
//! Stopping sends each group one SIGTERM and waits for it to exit (a worker's warm shutdown), then SIGKILLs what
//! is left after `stop_timeout`, or at once on a second request. A one-shot that fails stops the whole stack.

use crate::SupervisorError;
use crate::spec::{Health, Service, Stack};
use crate::state::StateFile;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::Serialize;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Where a service is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Waiting for what it depends on.
    Waiting,
    /// Started, not yet healthy.
    Starting,
    /// Healthy (or started, without a health check).
    Ready,
    /// A one-shot that exited 0.
    Done,
    /// Exited; starting again after a pause.
    Restarting,
    /// A one-shot that failed.
    Failed,
    /// Optional and its program is missing.
    Skipped,
    /// Stopped by request.
    Stopped,
}

/// Timings of a run.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long a stopping service may take before it is SIGKILLed.
    pub stop_timeout: Duration,
    /// The first pause before a restart.
    pub backoff_start: Duration,
    /// The longest pause before a restart.
    pub backoff_max: Duration,
    /// Healthy this long, a service's backoff starts over.
    pub healthy_reset: Duration,
    /// How often health checks are tried.
    pub poll: Duration,
    /// Where `ps` and `down` find this run.
    pub state: Option<StateFile>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            stop_timeout: Duration::from_secs(75),
            backoff_start: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
            healthy_reset: Duration::from_secs(60),
            poll: Duration::from_millis(200),
            state: None,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Each service's last phase, in stack order.
    pub phases: Vec<(String, Phase)>,
    /// The one-shot failure that stopped the stack, if any.
    pub failed: Option<String>,
}

struct Ctx {
    options: Options,
    stop: CancellationToken,
    force: CancellationToken,
    width: usize,
    fatal: Mutex<Option<String>>,
}

/// Runs `stack` until `stop` is cancelled (then stops every service; `force` SIGKILLs at once), or until a
/// one-shot fails, or until every service has finished by itself.
pub async fn run(
    stack: Stack,
    options: Options,
    stop: CancellationToken,
    force: CancellationToken,
) -> Result<Summary, SupervisorError> {
    let width = stack
        .services
        .iter()
        .map(|s| s.name.len())
        .max()
        .unwrap_or(0);
    let ctx = Arc::new(Ctx {
        options,
        stop,
        force,
        width,
        fatal: Mutex::new(None),
    });
    let mut phases = Vec::new();
    for s in &stack.services {
        phases.push((s.name.clone(), watch::channel(Phase::Waiting)));
    }
    let receiver = |name: &str| {
        phases
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, (tx, _))| tx.subscribe())
            .expect("validated dependency")
    };
    let mut tasks = JoinSet::new();
    for (svc, (_, (tx, _))) in stack.services.iter().zip(&phases) {
        let deps: Vec<_> = svc.depends_on.iter().map(|d| receiver(d)).collect();
        tasks.spawn(supervise(svc.clone(), deps, tx.clone(), ctx.clone()));
    }
    let state_rx: Vec<_> = phases
        .iter()
        .map(|(n, (tx, _))| (n.clone(), tx.subscribe()))
        .collect();
    let snapshot = move || -> Vec<(String, Phase)> {
        state_rx
            .iter()
            .map(|(n, rx)| (n.clone(), *rx.borrow()))
            .collect()
    };
    let snapshot = Arc::new(snapshot);
    let writer = ctx.options.state.clone().map(|state| {
        let snapshot = snapshot.clone();
        tokio::spawn(async move {
            let mut last = Vec::new();
            loop {
                let now = snapshot();
                if now != last {
                    state.write(&now);
                    last = now;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    });
    while tasks.join_next().await.is_some() {}
    if let Some(w) = writer {
        w.abort();
        let _ = w.await;
    }
    let last = snapshot();
    if let Some(state) = &ctx.options.state {
        state.write(&last);
    }
    let failed = ctx.fatal.lock().expect("fatal").clone();
    Ok(Summary {
        phases: last,
        failed,
    })
}

fn say(ctx: &Ctx, name: &str, line: &str) {
    println!("{name:<w$} | {line}", w = ctx.width);
}

async fn supervise(
    svc: Service,
    mut deps: Vec<watch::Receiver<Phase>>,
    me: watch::Sender<Phase>,
    ctx: Arc<Ctx>,
) {
    for d in &mut deps {
        tokio::select! {
            _ = ctx.stop.cancelled() => {
                me.send_replace(Phase::Stopped);
                return;
            }
            r = d.wait_for(|p| matches!(p, Phase::Ready | Phase::Done | Phase::Skipped)) => {
                if r.is_err() {
                    me.send_replace(Phase::Stopped);
                    return;
                }
            }
        }
    }
    if let Some(hint) = svc
        .optional
        .as_ref()
        .filter(|_| !program_exists(&svc.command[0]))
    {
        say(
            &ctx,
            &svc.name,
            &format!("{} is not installed; skipped ({hint})", svc.command[0]),
        );
        me.send_replace(Phase::Skipped);
        return;
    }
    let mut backoff = ctx.options.backoff_start;
    loop {
        me.send_replace(Phase::Starting);
        let started = Instant::now();
        let (status, was_ready) = match start(&svc, &ctx) {
            Ok((child, pumps)) => match watch_child(&svc, child, pumps, &me, &ctx).await {
                Some(outcome) => outcome,
                None => {
                    me.send_replace(Phase::Stopped);
                    return;
                }
            },
            Err(e) => {
                say(
                    &ctx,
                    &svc.name,
                    &format!("cannot start {:?}: {e}", svc.command[0]),
                );
                (None, false)
            }
        };
        let how = status.map_or("could not start".to_string(), describe);
        if svc.oneshot {
            if status.is_some_and(|s| s.success()) {
                say(&ctx, &svc.name, "done");
                me.send_replace(Phase::Done);
            } else {
                let msg = format!("{} {how}", svc.name);
                error!(service = %svc.name, "{msg}; stopping the stack");
                say(&ctx, &svc.name, &format!("{how}; stopping the stack"));
                ctx.fatal.lock().expect("fatal").get_or_insert(msg);
                me.send_replace(Phase::Failed);
                ctx.stop.cancel();
            }
            return;
        }
        if was_ready && started.elapsed() >= ctx.options.healthy_reset {
            backoff = ctx.options.backoff_start;
        }
        warn!(service = %svc.name, "exited; restarting");
        say(
            &ctx,
            &svc.name,
            &format!("{how}; restarting in {:.1} s", backoff.as_secs_f64()),
        );
        me.send_replace(Phase::Restarting);
        tokio::select! {
            _ = ctx.stop.cancelled() => {
                me.send_replace(Phase::Stopped);
                return;
            }
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(ctx.options.backoff_max);
    }
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => "exited".into(),
    }
}

fn program_exists(program: &str) -> bool {
    if program.contains('/') {
        return std::path::Path::new(program).is_file();
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|p| p.join(program).is_file()))
        .unwrap_or(false)
}

type Pumps = Vec<tokio::task::JoinHandle<()>>;

fn start(svc: &Service, ctx: &Arc<Ctx>) -> std::io::Result<(Child, Pumps)> {
    let mut cmd = Command::new(&svc.command[0]);
    cmd.args(&svc.command[1..])
        .envs(&svc.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn()?;
    info!(service = %svc.name, pid = child.id(), "started");
    let mut pumps = Vec::new();
    if let Some(out) = child.stdout.take() {
        pumps.push(tokio::spawn(pump(out, svc.name.clone(), ctx.clone())));
    }
    if let Some(err) = child.stderr.take() {
        pumps.push(tokio::spawn(pump(err, svc.name.clone(), ctx.clone())));
    }
    Ok((child, pumps))
}

async fn pump(stream: impl AsyncRead + Unpin, name: String, ctx: Arc<Ctx>) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        say(&ctx, &name, &line);
    }
}

/// Waits for the child to exit (`Some((status, was ready))`) or for a stop (`None`, after stopping it).
async fn watch_child(
    svc: &Service,
    mut child: Child,
    pumps: Pumps,
    me: &watch::Sender<Phase>,
    ctx: &Arc<Ctx>,
) -> Option<(Option<ExitStatus>, bool)> {
    let pid = child.id();
    let ready = wait_ready(svc.health.clone(), ctx.options.poll);
    tokio::pin!(ready);
    let deadline = tokio::time::sleep(svc.ready_timeout);
    tokio::pin!(deadline);
    let mut was_ready = false;
    let mut late = false;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status.ok(),
            _ = ctx.stop.cancelled() => {
                terminate(svc, &mut child, pid, ctx).await;
                for p in pumps {
                    let _ = p.await;
                }
                return None;
            }
            _ = &mut ready, if !was_ready && !svc.oneshot => {
                was_ready = true;
                me.send_replace(Phase::Ready);
                say(ctx, &svc.name, "ready");
            }
            _ = &mut deadline, if !was_ready && !late => {
                late = true;
                let what = if svc.oneshot { "still running" } else { "not ready" };
                say(ctx, &svc.name, &format!("{what} after {:.0} s", svc.ready_timeout.as_secs_f64()));
            }
        }
    };
    for p in pumps {
        let _ = p.await;
    }
    Some((status, was_ready))
}

async fn wait_ready(health: Option<Health>, poll: Duration) {
    let Some(health) = health else { return };
    loop {
        if check(&health).await {
            return;
        }
        tokio::time::sleep(poll).await;
    }
}

/// One health check: a TCP connect, or an HTTP/1.0 GET answered with a 2xx status.
pub async fn check(health: &Health) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        match health {
            Health::Tcp(addr) => tokio::net::TcpStream::connect(addr.as_str()).await.is_ok(),
            Health::Http(url) => {
                let Some(rest) = url.strip_prefix("http://") else {
                    return false;
                };
                let (authority, path) = rest
                    .split_once('/')
                    .map_or((rest, "/".to_string()), |(a, p)| (a, format!("/{p}")));
                let Ok(mut s) = tokio::net::TcpStream::connect(authority).await else {
                    return false;
                };
                let req = format!(
                    "GET {path} HTTP/1.0\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
                );
                if s.write_all(req.as_bytes()).await.is_err() {
                    return false;
                }
                let mut head = [0u8; 16];
                let mut n = 0;
                while n < head.len() {
                    match s.read(&mut head[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k,
                    }
                }
                let line = String::from_utf8_lossy(&head[..n]);
                line.starts_with("HTTP/")
                    && line
                        .split_whitespace()
                        .nth(1)
                        .is_some_and(|c| c.starts_with('2'))
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .unwrap_or(false)
}

async fn terminate(svc: &Service, child: &mut Child, pid: Option<u32>, ctx: &Ctx) {
    let group = pid.map(|p| Pid::from_raw(p as i32));
    if let Some(g) = group {
        let _ = killpg(g, Signal::SIGTERM);
    }
    tokio::select! {
        status = child.wait() => {
            if let Ok(s) = status {
                say(ctx, &svc.name, &format!("stopped ({})", describe(s)));
            }
            return;
        }
        _ = tokio::time::sleep(ctx.options.stop_timeout) => {
            say(ctx, &svc.name, &format!("still running {:.0} s after SIGTERM; SIGKILL", ctx.options.stop_timeout.as_secs_f64()));
        }
        _ = ctx.force.cancelled() => {
            say(ctx, &svc.name, "SIGKILL (second stop request)");
        }
    }
    if let Some(g) = group {
        let _ = killpg(g, Signal::SIGKILL);
    }
    let _ = child.wait().await;
}
