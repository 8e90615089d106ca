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
    /// RabbitMQ answered with an error or the connection failed.
    #[error("amqp: {0}")]
    Amqp(#[from] lapin::Error),
    /// No connection right now (the transport is reconnecting).
    #[error("{0}")]
    NotConnected(String),
    /// The queue exists on the broker with other arguments than configured.
    #[error(
        "queue {queue:?} already exists on RabbitMQ with other arguments: {argument} is {theirs} there but the configuration asks for {ours}; delete the queue (rabbitmqctl delete_queue {queue}) or change task_queues.{queue}.queue_arguments to match"
    )]
    QueueMismatch {
        /// Queue name.
        queue: String,
        /// The argument that differs (`x-max-length`, `durable`, ...).
        argument: String,
        /// What the configuration asks for.
        ours: String,
        /// What the broker has.
        theirs: String,
    },
    /// Back-pressure: the queue is at its `x-max-length` and refuses publishes (`x-overflow: reject-publish`).
    #[error(
        "queue {queue:?} is full: RabbitMQ refused the message (x-max-length reached, x-overflow reject-publish); nothing was enqueued, retry later"
    )]
    QueueFull {
        /// Queue name.
        queue: String,
    },
    /// A mandatory publish matched no queue.
    #[error(
        "message to exchange {exchange:?} with routing key {routing_key:?} was returned unroutable ({reason}): no such queue"
    )]
    Unroutable {
        /// Exchange (empty: the default exchange).
        exchange: String,
        /// Routing key.
        routing_key: String,
        /// RabbitMQ's reply text.
        reason: String,
    },
    /// The transport cannot do this.
    #[error("{0}")]
    Unsupported(&'static str),
    /// A message could not be decoded or encoded.
    #[error(transparent)]
    Protocol(#[from] celeriac_protocol::ProtocolError),
    /// A stored message could not be read back (`unacked` entry).
    #[error("cannot read stored message: {0}")]
    Stored(String),
}
