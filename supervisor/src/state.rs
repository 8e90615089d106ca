//! Where `celeriac ps` and `celeriac down` find a running stack: a small JSON file with the supervisor's pid
//! and each service's phase, rewritten as phases change.

use crate::run::Phase;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The state file of one stack.
#[derive(Debug, Clone)]
pub struct StateFile {
    /// Its path.
    pub path: PathBuf,
}

/// What the file holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct State {
    /// The supervisor's pid.
    pub pid: u32,
    /// Each service and its phase, in stack order.
    pub services: Vec<(String, String)>,
}

impl StateFile {
    /// The file at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// Writes this process's state (best effort: a read-only place only loses `ps`).
    pub fn write(&self, phases: &[(String, Phase)]) {
        let state = State {
            pid: std::process::id(),
            services: phases
                .iter()
                .map(|(n, p)| {
                    let phase = serde_json::to_value(p)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default();
                    (n.clone(), phase)
                })
                .collect(),
        };
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = self.path.with_extension("tmp");
        if std::fs::write(&tmp, serde_json::to_vec_pretty(&state).unwrap_or_default()).is_ok() {
            let _ = std::fs::rename(&tmp, &self.path);
        }
    }

    /// The state of a stack whose supervisor is still running, or `None`.
    pub fn read_live(&self) -> Option<State> {
        let text = std::fs::read(&self.path).ok()?;
        let state: State = serde_json::from_slice(&text).ok()?;
        alive(state.pid).then_some(state)
    }

    /// Asks the running supervisor to stop (one SIGTERM) and waits up to `timeout` for it to exit; `false`
    /// when none runs.
    pub async fn stop(&self, timeout: Duration) -> Result<bool, String> {
        let Some(state) = self.read_live() else {
            return Ok(false);
        };
        kill(Pid::from_raw(state.pid as i32), Signal::SIGTERM).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + timeout;
        while alive(state.pid) {
            if Instant::now() > deadline {
                return Err(format!(
                    "the supervisor (pid {}) still runs after {:.0} s",
                    state.pid,
                    timeout.as_secs_f64()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(true)
    }
}

fn alive(pid: u32) -> bool {
    kill(Pid::from_raw(pid as i32), None).is_ok()
}
