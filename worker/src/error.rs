//! Errors that stop a worker.

use thiserror::Error;

/// Errors that stop a worker from starting or running.
#[derive(Debug, Error)]
pub enum WorkerError {
    /// The broker failed.
    #[error(transparent)]
    Broker(#[from] celeriac_broker::BrokerError),
    /// The result backend failed.
    #[error(transparent)]
    Backend(#[from] celeriac_backend::BackendError),
    /// Configuration is invalid.
    #[error("configuration: {0}")]
    Config(String),
    /// The metrics server could not bind.
    #[error("metrics server on {addr}: {source}")]
    Metrics {
        /// Address.
        addr: String,
        /// Cause.
        source: std::io::Error,
    },
}
