//! Broker errors.

use thiserror::Error;

/// Why a broker operation failed.
#[derive(Debug, Error)]
pub enum BrokerError {
    /// The URL is not one we can use; the text says why.
    #[error("invalid broker URL {url:?}: {reason}")]
    Url {
        /// The URL given (password masked).
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Redis answered with an error or the connection failed.
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    /// A stored message could not be read back (`unacked` entry).
    #[error("cannot read stored message: {0}")]
    Stored(String),
}
