//! Celery brokers: the [`Broker`] traits the worker and publishers use (the core and small capability
//! traits: leases, parking, shared rate limits, events, remote control), and its kombu-compatible Redis and
//! RabbitMQ transports. A broker is chosen once from the URL scheme ([`connect`]) and held as `Arc<dyn Broker>`.
//!
//! # Layout
//! - [`url`]: broker URLs (`redis://`, `rediss://`, `redis+socket://`, `amqp://`, `amqps://`) and their kombu
//!   spellings.
//! - [`redis`]: the Redis transport (keys, Lua scripts, consume/ack/restore, publish).
//! - [`amqp`]: the RabbitMQ transport (topology, consumers with per-consumer QoS, confirms, reconnection).
//! - [`pidbox`]: the client side of remote control (broadcast a command, collect replies).
//! - `memory` (feature `test-utils`): an in-memory broker for fast runtime tests.
//! - [`error`]: the error type, [`BrokerError`].

pub mod amqp;
pub mod error;
#[cfg(any(test, feature = "test-utils"))]
pub mod memory;
pub mod pidbox;
pub mod redis;
pub mod sentinel;
pub mod url;

use async_trait::async_trait;
use celeriac_protocol::{ProtocolError, TaskMessage};
use std::sync::Arc;
use std::time::Duration;

pub use error::BrokerError;

/// Result alias for broker operations.
pub type Result<T, E = BrokerError> = std::result::Result<T, E>;

/// A message taken from a queue and held unacknowledged until [`BrokerCore::ack`] (or given back): what the
/// transport needs to acknowledge, requeue or dead-letter it.
#[derive(Debug, Clone)]
pub struct Held {
    /// Transport delivery tag (kombu's `properties.delivery_tag`).
    pub tag: String,
    /// The queue it was taken from.
    pub queue: String,
    /// The message exactly as received (for dead-lettering and requeueing).
    pub raw: Vec<u8>,
    /// `delivery_info.exchange`.
    pub exchange: String,
    /// `delivery_info.routing_key`.
    pub routing_key: String,
    /// Whether the transport has delivered this message before.
    pub redelivered: bool,
    /// The AMQP properties as delivered (RabbitMQ only), to republish the message unchanged.
    pub amqp_properties: Option<Arc<lapin::BasicProperties>>,
}

/// One delivery: the held message and its decoded task, or why it could not be decoded (the worker
/// dead-letters those).
#[derive(Debug)]
pub struct Delivery {
    /// Transport record.
    pub held: Held,
    /// The decoded task.
    pub message: std::result::Result<TaskMessage, ProtocolError>,
}

/// How a consumer chooses between several queues.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum QueueOrder {
    /// Strictly in the order given: a later queue is served only when the earlier ones are empty
    /// (`realtime` before `bulk`).
    #[default]
    Priority,
    /// Each fetch takes at most a share of the batch from each queue, proportional to its weight, then fills
    /// the rest in order; a weight of 0 gives only leftovers.
    Weighted(Vec<u32>),
}

/// How a worker picks the next RabbitMQ node of a failover list when its connection is lost (Celery's
/// `broker_failover_strategy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailoverStrategy {
    /// The nodes in the order given, starting after the one that was lost (kombu's default).
    #[default]
    RoundRobin,
    /// A random order for each reconnection.
    Shuffle,
}

/// Options shared by all transports.
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    /// Messages unacked for longer than this are given back to their queue (kombu `visibility_timeout`).
    pub visibility_timeout: Duration,
    /// Prefix for every key (kombu `global_keyprefix`).
    pub global_keyprefix: String,
    /// Queue selection order when consuming several queues.
    pub queue_order: QueueOrder,
    /// Unacknowledged messages RabbitMQ may push to each consumer (per-consumer `basic.qos`); 0 = no limit.
    pub prefetch: u16,
    /// The worker's node name (`celery@host`): names its remote-control queue and its connection.
    pub node_name: Option<String>,
    /// AMQP queue arguments per queue (`x-max-length`, `x-overflow`, `x-max-priority`, `x-queue-type`,
    /// `x-dead-letter-exchange`, ...), as Celery's `task_queues` `queue_arguments`.
    pub queue_arguments:
        std::collections::HashMap<String, serde_json::Map<String, serde_json::Value>>,
    /// AMQP arguments every declared task queue gets where its own entry does not set them
    /// (`x-max-priority` from Celery's `task_queue_max_priority`).
    pub common_queue_arguments: serde_json::Map<String, serde_json::Value>,
    /// With a `sentinel://` URL: the master's name and the sentinels' credentials.
    pub sentinel: sentinel::SentinelOptions,
    /// With a list of RabbitMQ nodes: the order in which they are tried.
    pub failover: FailoverStrategy,
}

impl Default for BrokerOptions {
    fn default() -> Self {
        Self {
            visibility_timeout: Duration::from_secs(3600),
            global_keyprefix: String::new(),
            queue_order: QueueOrder::Priority,
            prefetch: 16,
            node_name: None,
            queue_arguments: std::collections::HashMap::new(),
            common_queue_arguments: serde_json::Map::new(),
            sentinel: sentinel::SentinelOptions::default(),
            failover: FailoverStrategy::RoundRobin,
        }
    }
}

/// The core of a Celery broker: queues, deliveries and their settlement, publishing.
#[async_trait]
pub trait BrokerCore: Send + Sync + 'static {
    /// Declares queues so that Celery tools and publishers find them (kombu binding tables).
    async fn declare(&self, queues: &[String]) -> Result<()>;

    /// Acknowledges `acks`, then takes up to `max` messages from `queues`, recording each as unacked before
    /// returning it. When nothing was acknowledged and all queues are empty, waits up to `wait` for a
    /// message. Returns an empty list on timeout. Acks and fetch share one round trip where the transport can.
    async fn fetch(
        &self,
        queues: &[String],
        max: usize,
        acks: &[String],
        wait: Duration,
    ) -> Result<Vec<Delivery>>;

    /// Acknowledges deliveries: they are gone for good.
    async fn ack(&self, tags: &[String]) -> Result<()>;

    /// Waits until every ack queued so far has left for the broker, where a transport settles in the
    /// background (AMQP's basic.ack has no reply). The worker calls it before storing results whose early
    /// acks must land first. Transports whose `ack` returns once applied do nothing.
    async fn flush_acks(&self) -> Result<()> {
        Ok(())
    }

    /// Gives deliveries back to their queues with the redelivered flag: `front` puts them next in line
    /// (kombu's restore), otherwise at the back (kombu's `reject(requeue=True)`).
    async fn requeue(&self, held: &[&Held], front: bool) -> Result<usize>;

    /// Moves a delivery that cannot be processed to the dead-letter list of its queue, with the reason, and
    /// acknowledges it, atomically.
    async fn dead_letter(&self, held: &Held, reason: &str) -> Result<()>;

    /// Publishes a task to a queue (Celery's anonymous-exchange routing: routing key = queue name).
    async fn publish(&self, message: &TaskMessage, queue: &str) -> Result<()>;

    /// Number of messages waiting in a queue (all priorities).
    async fn queue_length(&self, queue: &str) -> Result<u64>;

    /// Deletes every waiting message of a queue; returns how many there were.
    async fn purge(&self, queue: &str) -> Result<u64>;

    /// Round trip to the broker.
    async fn ping(&self) -> Result<()>;

    /// Ends a `fetch` of this broker that is blocked waiting for messages, so the next one uses a new
    /// queue list (`cancel_consumer`). Transports that never block a fetch on the server do nothing.
    async fn interrupt_fetch(&self) -> Result<()> {
        Ok(())
    }

    /// The URL scheme family, for logs.
    fn transport(&self) -> &'static str;

    /// False while the transport knows its connection is down (`/health` answers 503 then).
    fn is_connected(&self) -> bool {
        true
    }

    /// True when a message held in worker memory keeps occupying the broker's prefetch window (AMQP QoS):
    /// the worker then parks ETA tasks in the broker instead of holding them.
    fn holds_cost_prefetch(&self) -> bool {
        false
    }
}

/// Visibility leases: unacked deliveries stay this consumer's while it renews them; expired ones of dead
/// consumers are given back.
#[async_trait]
pub trait Leases: Send + Sync + 'static {
    /// Extends the visibility lease of deliveries still being worked on, so no other worker restores them.
    async fn renew(&self, tags: &[String]) -> Result<()>;

    /// Gives back every unacked message whose lease expired (a crashed consumer's). Returns how many.
    async fn restore_visible(&self) -> Result<usize>;
}

/// Parking: ETA tasks far in the future wait in the broker, not in worker memory.
#[async_trait]
pub trait Parking: Send + Sync + 'static {
    /// Parks a held message until `due` (ETA tasks far in the future): it leaves `unacked` atomically, so no
    /// visibility timeout redelivers it, and [`Parking::unpark_due`] on any worker republishes it when due.
    /// Returns false when the message was no longer held (already restored elsewhere).
    async fn park(&self, held: &Held, due: chrono::DateTime<chrono::Utc>) -> Result<bool>;

    /// Republishes parked messages of `queues` due by `by` to the front of their queues; returns how many.
    async fn unpark_due(
        &self,
        queues: &[String],
        by: chrono::DateTime<chrono::Utc>,
    ) -> Result<usize>;

    /// Number of parked messages of a queue.
    async fn parked(&self, queue: &str) -> Result<u64>;
}

/// Rate limits shared by every worker of the cluster.
#[async_trait]
pub trait SharedLimits: Send + Sync + 'static {
    /// Takes one token from a rate limiter shared by all workers (`interval` between tokens, bursts of
    /// `burst`). `None`: go ahead; `Some(wait)`: try again after `wait`.
    async fn take_shared_token(
        &self,
        key: &str,
        interval: Duration,
        burst: u32,
    ) -> Result<Option<Duration>>;
}

/// Celery events (`celeryev`): publishing them and following them.
#[async_trait]
pub trait EventBus: Send + Sync + 'static {
    /// Publishes Celery events (`(routing key, envelope)` pairs, e.g. `task.succeeded`) to the `celeryev`
    /// exchange, in one round trip.
    async fn publish_events(&self, events: &[(String, Vec<u8>)]) -> Result<()>;

    /// Every Celery event published from now on (what `celery events` and Flower receive), as envelopes.
    /// The stream ends when the connection is lost; subscribe again.
    async fn event_stream(&self) -> Result<futures::stream::BoxStream<'static, Vec<u8>>>;
}

/// Remote control (kombu's pidbox): requests, replies, and the revoked ids every worker keeps.
#[async_trait]
pub trait RemoteControl: Send + Sync + 'static {
    /// Remote-control requests broadcast to workers (kombu's `celery.pidbox` fanout), as raw envelopes.
    async fn control_requests(&self) -> Result<futures::stream::BoxStream<'static, Vec<u8>>>;

    /// Sends a remote-control reply envelope to the client's reply queue (`reply.celery.pidbox`, routing key
    /// = the client's oid).
    async fn control_reply(&self, routing_key: &str, envelope: &[u8]) -> Result<()>;

    /// Records revoked task ids for every worker, now and after restarts (kept `keep` long).
    async fn add_revoked(&self, ids: &[String], keep: Duration) -> Result<()>;

    /// Revoked task ids still kept.
    async fn revoked(&self) -> Result<Vec<String>>;

    /// Broadcasts a remote-control request (the client side of [`RemoteControl::control_requests`]) and collects the
    /// reply envelopes sent to reply queue `oid` within `timeout`, or until `limit` replies came (kombu stops
    /// after one reply per destination); the reply queue is declared first and deleted afterwards, as
    /// Celery's client does.
    async fn control_call(
        &self,
        envelope: &[u8],
        oid: &str,
        timeout: Duration,
        limit: Option<usize>,
    ) -> Result<Vec<Vec<u8>>>;
}

/// A Celery broker as the worker and publishers see it: the core and every capability. The Redis, RabbitMQ
/// and in-memory transports implement each trait; a component that needs one capability only (a publisher,
/// an event follower) can take that trait alone.
pub trait Broker: BrokerCore + Leases + Parking + SharedLimits + EventBus + RemoteControl {}

impl<T> Broker for T where T: BrokerCore + Leases + Parking + SharedLimits + EventBus + RemoteControl
{}

/// The broker traits, for `use celeriac_broker::prelude::*` where their methods are called.
pub mod prelude {
    pub use crate::{Broker, BrokerCore, EventBus, Leases, Parking, RemoteControl, SharedLimits};
}

/// Per-queue caps for the first fetch pass, and how many passes to run.
pub(crate) fn caps(order: &QueueOrder, queues: usize, max: usize) -> (Vec<usize>, u8) {
    match order {
        QueueOrder::Priority => (vec![max; queues], 1),
        QueueOrder::Weighted(weights) => {
            let w: Vec<u64> = (0..queues)
                .map(|i| u64::from(weights.get(i).copied().unwrap_or(1)))
                .collect();
            let total: u64 = w.iter().sum::<u64>().max(1);
            let caps = w
                .iter()
                .map(|wi| ((max as u64 * wi).div_ceil(total)) as usize)
                .collect();
            (caps, 2)
        }
    }
}

/// Connects to the broker named by `url`.
pub async fn connect(url: &str, options: BrokerOptions) -> Result<Arc<dyn Broker>> {
    let parsed = url::BrokerUrl::parse(url)?;
    match parsed {
        url::BrokerUrl::Redis(info) => {
            Ok(Arc::new(redis::RedisBroker::connect(info, options).await?))
        }
        url::BrokerUrl::Amqp(uri) => Ok(Arc::new(amqp::AmqpBroker::connect(uri, options).await?)),
        url::BrokerUrl::Sentinel(_) => {
            let target = sentinel::target(url, &options.sentinel)
                .await
                .map_err(|reason| BrokerError::Url {
                    url: url::redact(url),
                    reason,
                })?;
            Ok(Arc::new(
                redis::RedisBroker::connect(target, options).await?,
            ))
        }
    }
}
