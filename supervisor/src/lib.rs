//! A native supervisor for a stack of processes, what `celeriac up` runs where no Docker daemon is: services
//! from a stack file, started once what they depend on is healthy, their output prefixed with their name,
//! restarted with backoff when they exit, stopped with one SIGTERM each (waiting for warm shutdowns).
//!
//! # Layout
//! - [`spec`]: the stack file (services, commands, health checks, dependencies, variables).
//! - [`run`]: running a stack: start order, health, restarts, stopping.
//! - [`state`]: the state file behind `celeriac ps` and `celeriac down`.

pub mod run;
pub mod spec;
pub mod state;

pub use run::{Options, Phase, Summary, run};
pub use spec::{Health, Service, Stack};
pub use state::StateFile;

/// Why a stack cannot run.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// The stack file is wrong.
    #[error("stack file: {0}")]
    Stack(String),
}
