//! The RabbitMQ transport (`amqp://`, `amqps://`, kombu's `pyamqp://`), built on lapin. Python Celery
//! clients and workers share its queues: Celery's topology (spec §3.1), raw JSON bodies with task headers
//! in the AMQP header table (§3.2), per-consumer QoS (never global: RabbitMQ 4 refuses it), `basic.ack` /
//! `basic.reject(requeue)` (§3.3), events on `celeryev` and remote control on `celery.pidbox` (§3.4).
//!
//! Beyond Celery:
//! - every message a worker publishes waits for its publisher confirm, and `mandatory` makes an unroutable
//!   one an error; a queue full under `x-overflow: reject-publish` surfaces as
//!   [`BrokerError::QueueFull`](crate::BrokerError::QueueFull);
//! - a supervisor reconnects with backoff after connection or channel loss, redeclares, resumes consuming
//!   and says so in the log; a watchdog restarts consumers that stopped receiving while messages wait;
//! - ETA tasks are parked inside RabbitMQ through kombu's native delayed delivery topology, so they hold
//!   no prefetch slot and no worker memory while they wait;
//! - revoked ids persist in the durable queue `celeriac.revoked`;
//! - a cluster's nodes as kombu's failover list: a lost node is replaced by the next that accepts.
//!
//! # Layout
//! This file holds the shared state (the broker, its connection generation's [`Link`] and consumer
//! [`State`]) and the small helpers; each part of the transport has its file, as in `redis/`:
//! - `connection`: connecting, the live link, loss and the reconnecting supervisor.
//! - `consumer`: consumers into per-queue buffers, taking in queue order, the stall watchdog.
//! - `settle`: acks and rejects, in order, with `multiple` acks where safe.
//! - `publisher`: queue and exchange declaration, confirmed publishes.
//! - `delay`: kombu's native delayed delivery topology for ETA parking.
//! - `control`: the pidbox consumer and the transient queue shape of control, replies and events.
//! - `broker`: the [`Broker`](crate::Broker) trait over those parts.
//! - [`nodes`]: the failover list and the node in use.
//! - [`table`]: header tables ↔ JSON, task messages ↔ AMQP messages.
//! - [`topology`]: names, arguments and declaration errors.

mod broker;
mod connection;
mod consumer;
mod control;
mod delay;
pub mod nodes;
mod publisher;
mod settle;
pub mod table;
pub mod topology;

use crate::{BrokerOptions, Result};
use consumer::to_delivery;
use control::transient_consumer;
use lapin::message::Delivery as AmqpDelivery;
use lapin::options::QueueDeclareOptions;
use lapin::types::ShortString;
use lapin::{Channel, Connection};
use publisher::held_properties;
use serde_json::{Map, Value};
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

/// How long a publish waits for its confirm before it counts as failed.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an operation waits for a lost connection to come back before failing.
const RECONNECT_WAIT: Duration = Duration::from_secs(10);
/// A consumer that received nothing for this long while messages wait is restarted.
const WATCHDOG_SILENCE: Duration = Duration::from_secs(15);

/// A RabbitMQ broker. Cloning is not needed: share it as `Arc<dyn Broker>`.
pub struct AmqpBroker {
    inner: Arc<Inner>,
    stop: CancellationToken,
    supervisor: Mutex<Option<tokio::task::JoinHandle<()>>>,
    settler: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for AmqpBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpBroker")
            .field("url", &crate::url::redact(&self.inner.uri))
            .finish()
    }
}

struct Inner {
    uri: String,
    nodes: nodes::Nodes,
    options: BrokerOptions,
    link: Mutex<Option<Arc<Link>>>,
    generation: AtomicU64,
    connecting: tokio::sync::Mutex<()>,
    state: Mutex<State>,
    arrived: Notify,
    /// Where remote-control requests go once [`Broker::control_requests`](crate::Broker::control_requests) was called.
    pidbox: Mutex<Option<mpsc::UnboundedSender<Vec<u8>>>>,
    /// Queues declared so far (redeclared after a reconnect).
    declared: Mutex<BTreeSet<String>>,
    /// Acks and rejects, in the order they were settled, to the task that sends them (see [`settle::settle_loop`]).
    settles: mpsc::UnboundedSender<settle::SettleBatch>,
}

/// Consumer-side state of the current connection generation.
struct State {
    generation: u64,
    buffers: HashMap<String, VecDeque<AmqpDelivery>>,
    /// Delivery tag → queue of every message handed to the worker and not yet settled.
    outstanding: HashMap<u64, String>,
    consuming: Vec<String>,
    /// Every delivery tag up to this one has reached a buffer (tags are channel-wide, but each queue's pump
    /// pushes on its own, so a lower tag may still be on its way): the bound for `multiple` acks.
    contiguous: u64,
    /// Tags that arrived above `contiguous`.
    ahead: std::collections::BTreeSet<u64>,
    waiting_since: Option<Instant>,
    last_delivery: Instant,
}

/// One connection and its channels.
struct Link {
    generation: u64,
    conn: Connection,
    /// Consumes and acknowledges (per-consumer QoS); also publishes events and control replies.
    consume: Channel,
    /// Publishes tasks with confirms.
    publish: Channel,
    consumers: tokio::sync::Mutex<HashMap<String, (String, tokio::task::JoinHandle<()>)>>,
    pidbox: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Exchanges and delay bindings declared on this connection.
    setup: tokio::sync::Mutex<HashSet<String>>,
}

impl Drop for Link {
    fn drop(&mut self) {
        if let Ok(mut c) = self.consumers.try_lock() {
            for (_, (_, h)) in c.drain() {
                h.abort();
            }
        }
        if let Some(h) = self.pidbox.lock().expect("pidbox").take() {
            h.abort();
        }
    }
}

fn short(s: &str) -> ShortString {
    ShortString::from(s)
}

fn tag_of(generation: u64, delivery_tag: u64) -> String {
    format!("{generation}:{delivery_tag}")
}

fn parse_tag(tag: &str) -> Option<(u64, u64)> {
    let (g, t) = tag.split_once(':')?;
    Some((g.parse().ok()?, t.parse().ok()?))
}

fn durable_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

fn transient_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: false,
        auto_delete: true,
        exclusive: true,
        ..QueueDeclareOptions::default()
    }
}

fn is_not_found(e: &lapin::Error) -> bool {
    e.to_string().contains("NOT_FOUND")
}

impl AmqpBroker {
    /// Connects (failing fast if RabbitMQ does not answer) and starts the reconnecting supervisor.
    pub async fn connect(uri: String, options: BrokerOptions) -> Result<Self> {
        let (settles, settle_rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            nodes: nodes::Nodes::new(&uri, options.failover),
            uri,
            options,
            link: Mutex::new(None),
            generation: AtomicU64::new(0),
            connecting: tokio::sync::Mutex::new(()),
            state: Mutex::new(State {
                generation: 0,
                buffers: HashMap::new(),
                outstanding: HashMap::new(),
                consuming: Vec::new(),
                contiguous: 0,
                ahead: std::collections::BTreeSet::new(),
                waiting_since: None,
                last_delivery: Instant::now(),
            }),
            arrived: Notify::new(),
            pidbox: Mutex::new(None),
            declared: Mutex::new(BTreeSet::new()),
            settles,
        });
        Inner::reconnect(&inner).await?;
        let stop = CancellationToken::new();
        let supervisor = tokio::spawn(connection::supervise(Arc::downgrade(&inner), stop.clone()));
        let settler = tokio::spawn(settle::settle_loop(Arc::downgrade(&inner), settle_rx));
        Ok(Self {
            inner,
            stop,
            supervisor: Mutex::new(Some(supervisor)),
            settler: Mutex::new(Some(settler)),
        })
    }

    /// Closes the connection and stops the supervisor.
    pub async fn close(&self) {
        self.stop.cancel();
        let handle = self.supervisor.lock().expect("supervisor").take();
        if let Some(h) = handle {
            let _ = h.await;
        }
        // Let queued acks go out before the connection closes.
        let _ = self.inner.enqueue(Vec::new(), true).await;
        if let Some(h) = self.settler.lock().expect("settler").take() {
            h.abort();
        }
        let link = self.inner.link.lock().expect("link").take();
        if let Some(link) = link {
            let _ = link.conn.close(200, short("celeriac closing")).await;
        }
    }
}

impl Drop for AmqpBroker {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(h) = self.supervisor.lock().expect("supervisor").take() {
            h.abort();
        }
        if let Some(h) = self.settler.lock().expect("settler").take() {
            h.abort();
        }
    }
}

/// The queue arguments celeriac gives its two standard queues unless configured otherwise: at most 1,000
/// realtime and 5,000 bulk messages, refusing publishes beyond (back-pressure to producers).
pub fn default_queue_arguments(queue: &str) -> Option<Map<String, Value>> {
    let max = match queue {
        "realtime" => 1_000,
        "bulk" => 5_000,
        _ => return None,
    };
    let mut m = Map::new();
    m.insert("x-max-length".into(), max.into());
    m.insert("x-overflow".into(), "reject-publish".into());
    Some(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_carry_the_generation() {
        assert_eq!(parse_tag(&tag_of(3, 42)), Some((3, 42)));
        assert_eq!(parse_tag("uuid-like-redis-tag"), None);
    }

    #[test]
    fn standard_queue_limits() {
        assert_eq!(
            default_queue_arguments("realtime").unwrap()["x-max-length"],
            1000
        );
        assert_eq!(
            default_queue_arguments("bulk").unwrap()["x-max-length"],
            5000
        );
        assert_eq!(
            default_queue_arguments("bulk").unwrap()["x-overflow"],
            "reject-publish"
        );
        assert!(default_queue_arguments("celery").is_none());
    }
}
