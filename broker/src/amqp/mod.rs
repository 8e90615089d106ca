//! The RabbitMQ transport (`amqp://`, `amqps://`, kombu's `pyamqp://`), built on lapin. Python Celery
//! clients and workers share its queues: Celery's topology (spec §3.1), raw JSON bodies with task headers
//! in the AMQP header table (§3.2), per-consumer QoS (never global: RabbitMQ 4 refuses it), `basic.ack` /
//! `basic.reject(requeue)` (§3.3), events on `celeryev` and remote control on `celery.pidbox` (§3.4).
//!
//! Beyond Celery:
//! - every message a worker publishes waits for its publisher confirm, and `mandatory` makes an unroutable
//!   one an error; a queue full under `x-overflow: reject-publish` surfaces as [`BrokerError::QueueFull`];
//! - a supervisor reconnects with backoff after connection or channel loss, redeclares, resumes consuming
//!   and says so in the log; a watchdog restarts consumers that stopped receiving while messages wait;
//! - ETA tasks are parked inside RabbitMQ through kombu's native delayed delivery topology, so they hold
//!   no prefetch slot and no worker memory while they wait;
//! - revoked ids persist in the durable queue `celeriac.revoked`;
//! - a cluster's nodes as kombu's failover list: a lost node is replaced by the next that accepts.
//!
//! # Layout
//! - [`nodes`]: the failover list and the node in use.
//! - [`table`]: header tables ↔ JSON, task messages ↔ AMQP messages.
//! - [`topology`]: names, arguments and declaration errors.

pub mod nodes;
pub mod table;
pub mod topology;

use crate::{Broker, BrokerError, BrokerOptions, Delivery, Held, Result};
use async_trait::async_trait;
use celeriac_protocol::TaskMessage;
use futures::StreamExt;
use lapin::message::Delivery as AmqpDelivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions,
    BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions, ExchangeBindOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use serde_json::{Map, Value};
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

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
    /// Where remote-control requests go once [`Broker::control_requests`] was called.
    pidbox: Mutex<Option<mpsc::UnboundedSender<Vec<u8>>>>,
    /// Queues declared so far (redeclared after a reconnect).
    declared: Mutex<BTreeSet<String>>,
    /// Acks and rejects, in the order they were settled, to the task that sends them (see [`settle_loop`]).
    settles: mpsc::UnboundedSender<SettleBatch>,
}

/// One acknowledgement frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settle {
    Ack { tag: u64, multiple: bool },
    Reject { tag: u64 },
}

/// Frames for one connection generation, sent in order; `done` hears when they were written.
struct SettleBatch {
    generation: u64,
    ops: Vec<Settle>,
    done: Option<tokio::sync::oneshot::Sender<Result<()>>>,
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

/// A transient queue (exclusive, auto-delete, `args`) bound to `exchange` (declared as `kind`, `durable`)
/// with `routing_key`, consumed without acks: the shape of Celery's pidbox, reply and event queues.
async fn transient_consumer(
    ch: &Channel,
    exchange: &str,
    kind: ExchangeKind,
    durable: bool,
    queue: &str,
    routing_key: &str,
    args: &Map<String, Value>,
) -> Result<lapin::Consumer> {
    ch.exchange_declare(
        short(exchange),
        kind,
        ExchangeDeclareOptions {
            durable,
            ..ExchangeDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await?;
    ch.queue_declare(short(queue), transient_queue(), table::to_table(args))
        .await?;
    ch.queue_bind(
        short(queue),
        short(exchange),
        short(routing_key),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    Ok(ch
        .basic_consume(
            short(queue),
            short(""),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?)
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
        let supervisor = tokio::spawn(supervise(Arc::downgrade(&inner), stop.clone()));
        let settler = tokio::spawn(settle_loop(Arc::downgrade(&inner), settle_rx));
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

/// Sends acks and rejects in the order they were settled. Acks are never answered by the broker, so nobody
/// needs to wait for them (the fetch path does not); rejects are awaited by their caller. One ordered
/// stream matters: a `multiple` ack must never overtake an earlier single ack or reject of a lower tag.
async fn settle_loop(inner: Weak<Inner>, mut rx: mpsc::UnboundedReceiver<SettleBatch>) {
    while let Some(batch) = rx.recv().await {
        let Some(inner) = inner.upgrade() else { return };
        let res = match inner.current() {
            Some(link) if link.generation == batch.generation && !batch.ops.is_empty() => {
                type Frame =
                    std::pin::Pin<Box<dyn std::future::Future<Output = lapin::Result<()>> + Send>>;
                let frames: Vec<Frame> = batch
                    .ops
                    .iter()
                    .map(|op| -> Frame {
                        let ch = link.consume.clone();
                        match *op {
                            Settle::Ack { tag, multiple } => Box::pin(async move {
                                ch.basic_ack(tag, BasicAckOptions { multiple }).await
                            }),
                            Settle::Reject { tag } => Box::pin(async move {
                                ch.basic_reject(tag, BasicRejectOptions { requeue: true })
                                    .await
                            }),
                        }
                    })
                    .collect();
                futures::future::join_all(frames)
                    .await
                    .into_iter()
                    .find_map(std::result::Result::err)
                    .map_or(Ok(()), |e| Err(BrokerError::Amqp(e)))
            }
            // A lost connection: RabbitMQ already requeued those messages.
            _ => Ok(()),
        };
        match batch.done {
            Some(done) => {
                let _ = done.send(res);
            }
            None => {
                if let Err(e) = res {
                    warn!(error = %e, "sending acknowledgements failed; RabbitMQ will redeliver those messages");
                }
            }
        }
    }
}

/// Reconnects after a loss (backoff 0.5 s doubling to 10 s) and watches consumers.
async fn supervise(inner: Weak<Inner>, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(500);
    let mut next_watch = Instant::now() + WATCHDOG_SILENCE;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        let Some(inner) = inner.upgrade() else { return };
        if inner.current().is_none() {
            match Inner::reconnect(&inner).await {
                Ok(link) => {
                    backoff = Duration::from_millis(500);
                    let consuming = inner.state.lock().expect("state").consuming.clone();
                    info!(generation = link.generation, queues = ?consuming, "reconnected to RabbitMQ; consuming again");
                }
                Err(e) => {
                    warn!(error = %e, retry_in = ?backoff, "reconnecting to RabbitMQ failed");
                    drop(inner);
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
            continue;
        }
        if Instant::now() >= next_watch {
            next_watch = Instant::now() + Duration::from_secs(5);
            inner.watchdog().await;
        }
    }
}

impl Inner {
    /// Arguments of celeriac's own durable queues (revoked ids, dead letters): the task queues' type, so that
    /// with quorum task queues they survive the loss of a cluster node too.
    fn own_queue_args(&self) -> FieldTable {
        let mut args = Map::new();
        if let Some(t) = self.options.common_queue_arguments.get("x-queue-type") {
            args.insert("x-queue-type".into(), t.clone());
        }
        table::to_table(&args)
    }

    fn current(&self) -> Option<Arc<Link>> {
        let guard = self.link.lock().expect("link");
        guard
            .as_ref()
            .filter(|l| l.conn.status().connected() && l.consume.status().connected())
            .cloned()
    }

    /// The live link, waiting up to [`RECONNECT_WAIT`] for the supervisor to bring one back.
    async fn link(&self) -> Result<Arc<Link>> {
        let deadline = Instant::now() + RECONNECT_WAIT;
        loop {
            if let Some(l) = self.current() {
                return Ok(l);
            }
            if Instant::now() >= deadline {
                return Err(BrokerError::NotConnected(format!(
                    "no connection to RabbitMQ at {} (reconnecting)",
                    crate::url::redact(&self.uri)
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Forgets a link that failed (`why`); the supervisor reconnects.
    fn lost(&self, generation: u64, why: &str) {
        let mut guard = self.link.lock().expect("link");
        if guard.as_ref().is_some_and(|l| l.generation == generation) {
            warn!(%why, generation, "lost the RabbitMQ connection; unacknowledged messages go back to their queues");
            let old = guard.take();
            drop(guard);
            let mut st = self.state.lock().expect("state");
            st.buffers.clear();
            st.outstanding.clear();
            drop(st);
            self.arrived.notify_one();
            if let Some(old) = old {
                tokio::spawn(async move {
                    let _ = old.conn.close(320, short("celeriac reconnecting")).await;
                });
            }
        }
    }

    async fn reconnect(this: &Arc<Self>) -> Result<Arc<Link>> {
        let _one = this.connecting.lock().await;
        if let Some(l) = this.current() {
            return Ok(l);
        }
        let name = this
            .options
            .node_name
            .clone()
            .unwrap_or_else(|| "celeriac".into());
        let props = ConnectionProperties::default()
            .with_connection_name(LongString::from(format!("celeriac {name}").as_bytes()));
        let conn = this.nodes.connect(props).await?;
        let consume = conn.create_channel().await?;
        consume
            .basic_qos(this.options.prefetch, BasicQosOptions { global: false })
            .await?;
        let publish = conn.create_channel().await?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let generation = this.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let link = Arc::new(Link {
            generation,
            conn,
            consume,
            publish,
            consumers: tokio::sync::Mutex::new(HashMap::new()),
            pidbox: Mutex::new(None),
            setup: tokio::sync::Mutex::new(HashSet::new()),
        });
        let declared: Vec<String> = this
            .declared
            .lock()
            .expect("declared")
            .iter()
            .cloned()
            .collect();
        for q in &declared {
            this.declare_queue(&link, q).await?;
        }
        let consuming = {
            let mut st = this.state.lock().expect("state");
            st.generation = generation;
            st.buffers.clear();
            st.outstanding.clear();
            st.contiguous = 0;
            st.ahead.clear();
            st.last_delivery = Instant::now();
            st.consuming.clone()
        };
        *this.link.lock().expect("link") = Some(Arc::clone(&link));
        this.start_consumers(&link, &consuming).await?;
        if this.pidbox.lock().expect("pidbox").is_some() {
            this.start_pidbox(&link).await?;
        }
        Ok(link)
    }

    /// Declares a task queue as Celery does (durable, bound to the `celery` direct exchange by its name) with
    /// the configured arguments.
    async fn declare_queue(&self, link: &Link, queue: &str) -> Result<()> {
        let ch = link.conn.create_channel().await?;
        ch.exchange_declare(
            short(topology::TASK_EXCHANGE),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
        let args = self
            .options
            .queue_arguments
            .get(queue)
            .cloned()
            .unwrap_or_default();
        let mut args = args;
        for (k, v) in &self.options.common_queue_arguments {
            args.entry(k.clone()).or_insert_with(|| v.clone());
        }
        if let Err(e) = ch
            .queue_declare(short(queue), durable_queue(), table::to_table(&args))
            .await
        {
            return Err(topology::declare_error(queue, &args, e));
        }
        ch.queue_bind(
            short(queue),
            short(topology::TASK_EXCHANGE),
            short(queue),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        let _ = ch.close(200, short("ok")).await;
        Ok(())
    }

    async fn start_consumers(self: &Arc<Self>, link: &Arc<Link>, queues: &[String]) -> Result<()> {
        let mut consumers = link.consumers.lock().await;
        let gone: Vec<String> = consumers
            .keys()
            .filter(|q| !queues.contains(q))
            .cloned()
            .collect();
        for q in gone {
            if let Some((tag, handle)) = consumers.remove(&q) {
                let _ = link
                    .consume
                    .basic_cancel(short(&tag), BasicCancelOptions::default())
                    .await;
                handle.abort();
                let buffered: Vec<AmqpDelivery> = {
                    let mut st = self.state.lock().expect("state");
                    st.buffers.remove(&q).map(Vec::from).unwrap_or_default()
                };
                let tags = buffered.iter().map(|d| d.delivery_tag).collect();
                let _ = self.enqueue_frames(tags, false, true, false).await;
                info!(queue = %q, "stopped consuming");
            }
        }
        for q in queues {
            if consumers.contains_key(q) {
                continue;
            }
            let tag = format!("celeriac-{}-{}", uuid::Uuid::new_v4().simple(), q);
            let consumer = link
                .consume
                .basic_consume(
                    short(q),
                    short(&tag),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| {
                    if is_not_found(&e) {
                        BrokerError::NotConnected(format!(
                            "queue {q:?} does not exist on RabbitMQ: {e}"
                        ))
                    } else {
                        BrokerError::Amqp(e)
                    }
                })?;
            let handle = tokio::spawn(pump(
                Arc::downgrade(self),
                link.generation,
                q.clone(),
                consumer,
            ));
            consumers.insert(q.clone(), (tag, handle));
        }
        Ok(())
    }

    async fn start_pidbox(self: &Arc<Self>, link: &Arc<Link>) -> Result<()> {
        let Some(tx) = self.pidbox.lock().expect("pidbox").clone() else {
            return Ok(());
        };
        let node = self
            .options
            .node_name
            .clone()
            .unwrap_or_else(|| format!("celeriac-{}", uuid::Uuid::new_v4().simple()));
        let queue = format!("{node}.celery.pidbox");
        let ch = link.conn.create_channel().await?;
        let mut consumer = transient_consumer(
            &ch,
            topology::PIDBOX_EXCHANGE,
            ExchangeKind::Fanout,
            false,
            &queue,
            "",
            &topology::control_queue_args(),
        )
        .await?;
        let handle = tokio::spawn(async move {
            let _ch = ch;
            while let Some(Ok(d)) = consumer.next().await {
                let env = table::to_envelope(
                    &d.properties,
                    &d.data,
                    d.exchange.as_str(),
                    d.routing_key.as_str(),
                );
                if tx.send(env).is_err() {
                    break;
                }
            }
        });
        *link.pidbox.lock().expect("pidbox") = Some(handle);
        Ok(())
    }

    fn arrived(&self, generation: u64, queue: &str, d: AmqpDelivery) {
        let mut st = self.state.lock().expect("state");
        if st.generation != generation {
            return; // RabbitMQ gives it to someone else: its channel is gone.
        }
        st.last_delivery = Instant::now();
        let tag = d.delivery_tag;
        if tag == st.contiguous + 1 {
            st.contiguous = tag;
            let st = &mut *st;
            while st.ahead.remove(&(st.contiguous + 1)) {
                st.contiguous += 1;
            }
        } else if tag > st.contiguous {
            st.ahead.insert(tag);
        }
        st.buffers
            .entry(queue.to_string())
            .or_default()
            .push_back(d);
        drop(st);
        self.arrived.notify_one();
    }

    /// Takes up to `max` buffered deliveries of connection `generation` in the configured queue order;
    /// `None` when that connection is gone (nothing is taken then).
    fn take(
        &self,
        generation: u64,
        queues: &[String],
        max: usize,
    ) -> Option<Vec<(String, AmqpDelivery)>> {
        let mut st = self.state.lock().expect("state");
        if st.generation != generation {
            return None;
        }
        let mut out = Vec::new();
        let caps = crate::caps(&self.options.queue_order, queues.len(), max);
        for pass in 0..caps.1 {
            for (i, q) in queues.iter().enumerate() {
                let room = max - out.len();
                let cap = if pass == 0 { caps.0[i].min(room) } else { room };
                if let Some(buf) = st.buffers.get_mut(q) {
                    let n = cap.min(buf.len());
                    out.extend(buf.drain(..n).map(|d| (q.clone(), d)));
                }
            }
        }
        for (q, d) in &out {
            st.outstanding.insert(d.delivery_tag, q.clone());
        }
        if !out.is_empty() {
            st.waiting_since = None;
        }
        Some(out)
    }

    /// Settles deliveries of the current generation (stale ones were requeued by RabbitMQ already).
    /// Settles `tags` of the current connection and queues their frames for [`settle_loop`], under the state
    /// lock so the order of frames is the order of settling. Acks below every still-unsettled tag (held by
    /// the worker, buffered, or possibly still on its way) go in one `multiple` ack. With `wait`, returns
    /// once the frames were written.
    async fn enqueue(&self, tags: Vec<u64>, ack: bool) -> Result<()> {
        self.enqueue_frames(tags, ack, true, true).await
    }

    async fn enqueue_frames(
        &self,
        mut tags: Vec<u64>,
        ack: bool,
        wait: bool,
        outstanding: bool,
    ) -> Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let mut st = self.state.lock().expect("state");
            if outstanding {
                for t in &tags {
                    st.outstanding.remove(t);
                }
            }
            let ops = if ack {
                let mut floor = st.contiguous + 1;
                if let Some(min) = st.outstanding.keys().min() {
                    floor = floor.min(*min);
                }
                for buf in st.buffers.values() {
                    if let Some(front) = buf.front() {
                        floor = floor.min(front.delivery_tag);
                    }
                }
                tags.sort_unstable();
                let below = tags.partition_point(|t| *t < floor);
                let mut ops = Vec::with_capacity(tags.len() - below + 1);
                if below >= 1 {
                    ops.push(Settle::Ack {
                        tag: tags[below - 1],
                        multiple: below >= 2,
                    });
                }
                ops.extend(tags[below..].iter().map(|&tag| Settle::Ack {
                    tag,
                    multiple: false,
                }));
                ops
            } else {
                tags.iter().map(|&tag| Settle::Reject { tag }).collect()
            };
            let batch = SettleBatch {
                generation: st.generation,
                ops,
                done: wait.then_some(tx),
            };
            if self.settles.send(batch).is_err() {
                return Ok(()); // closing: the connection goes, RabbitMQ requeues
            }
        }
        if wait {
            rx.await.unwrap_or(Ok(()))
        } else {
            Ok(())
        }
    }

    /// Delivery tags of `tags` that belong to the current connection (older ones were requeued by
    /// RabbitMQ when their channel closed).
    fn current_tags(&self, tags: &[String]) -> Vec<u64> {
        let generation = self.state.lock().expect("state").generation;
        tags.iter()
            .filter_map(|t| parse_tag(t))
            .filter(|(g, _)| *g == generation)
            .map(|(_, t)| t)
            .collect()
    }

    /// Publishes with a confirm; `mandatory` turns "no queue" into an error.
    async fn publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
        queue_for_errors: &str,
    ) -> Result<()> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let link = self.link().await?;
            let res = async {
                let confirm = link
                    .publish
                    .basic_publish(
                        short(exchange),
                        short(routing_key),
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        body,
                        props.clone(),
                    )
                    .await?;
                tokio::time::timeout(CONFIRM_TIMEOUT, confirm)
                    .await
                    .map_err(|_| {
                        BrokerError::NotConnected(format!(
                            "RabbitMQ did not confirm a publish to {queue_for_errors:?} within {CONFIRM_TIMEOUT:?}"
                        ))
                    })?
                    .map_err(BrokerError::Amqp)
            }
            .await;
            match res {
                Ok(Confirmation::Ack(None)) | Ok(Confirmation::NotRequested) => return Ok(()),
                Ok(Confirmation::Ack(Some(returned))) => {
                    return Err(BrokerError::Unroutable {
                        exchange: exchange.to_string(),
                        routing_key: routing_key.to_string(),
                        reason: returned.reply_text.as_str().to_string(),
                    });
                }
                Ok(Confirmation::Nack(_)) => {
                    return Err(BrokerError::QueueFull {
                        queue: queue_for_errors.to_string(),
                    });
                }
                Err(e) if attempt < 3 => {
                    warn!(error = %e, attempt, queue = %queue_for_errors, "publish not confirmed; retrying");
                    self.lost(link.generation, "publish failed");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Declares an exchange once per connection.
    async fn ensure_exchange(
        &self,
        link: &Link,
        name: &str,
        kind: ExchangeKind,
        durable: bool,
    ) -> Result<()> {
        let mut setup = link.setup.lock().await;
        let key = format!("exchange:{name}");
        if setup.contains(&key) {
            return Ok(());
        }
        let ch = link.conn.create_channel().await?;
        ch.exchange_declare(
            short(name),
            kind,
            ExchangeDeclareOptions {
                durable,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
        let _ = ch.close(200, short("ok")).await;
        setup.insert(key);
        Ok(())
    }

    /// Declares kombu's native delayed delivery topology (once per connection) and binds `queue` to its
    /// delivery exchange with `#.<queue>`.
    async fn ensure_delay(&self, link: &Link, queue: &str) -> Result<()> {
        let mut setup = link.setup.lock().await;
        let bound = format!("delay:{queue}");
        if setup.contains(&bound) {
            return Ok(());
        }
        let mut ch = link.conn.create_channel().await?;
        if !setup.contains("delay") {
            let topic = |durable| ExchangeDeclareOptions {
                durable,
                ..ExchangeDeclareOptions::default()
            };
            for n in (0..topology::DELAY_BITS).rev() {
                let name = topology::level_name(n);
                ch.exchange_declare(
                    short(&name),
                    ExchangeKind::Topic,
                    topic(true),
                    FieldTable::default(),
                )
                .await?;
                let args = topology::level_queue_args(n);
                if let Err(e) = ch
                    .queue_declare(short(&name), durable_queue(), table::to_table(&args))
                    .await
                {
                    // Declared by kombu as classic queues: use them as they are.
                    debug!(error = %e, queue = %name, "delay queue exists with other arguments");
                    ch = link.conn.create_channel().await?;
                }
                ch.queue_bind(
                    short(&name),
                    short(&name),
                    short(&topology::level_queue_binding(n)),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            }
            ch.exchange_declare(
                short(topology::DELAYED_DELIVERY_EXCHANGE),
                ExchangeKind::Topic,
                topic(true),
                FieldTable::default(),
            )
            .await?;
            for n in (0..topology::DELAY_BITS).rev() {
                let destination = if n > 0 {
                    topology::level_name(n - 1)
                } else {
                    topology::DELAYED_DELIVERY_EXCHANGE.to_string()
                };
                ch.exchange_bind(
                    short(&destination),
                    short(&topology::level_name(n)),
                    short(&topology::level_skip_binding(n)),
                    ExchangeBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            }
            setup.insert("delay".into());
        }
        ch.queue_bind(
            short(queue),
            short(topology::DELAYED_DELIVERY_EXCHANGE),
            short(&format!("#.{queue}")),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        let _ = ch.close(200, short("ok")).await;
        setup.insert(bound);
        Ok(())
    }

    /// Restarts consumers that stopped receiving while messages wait (celery#8030-style silent stalls).
    async fn watchdog(&self) {
        let Some(link) = self.current() else { return };
        let (stalled_for, silent_for, consuming, outstanding) = {
            let st = self.state.lock().expect("state");
            let mut per_queue: HashMap<String, usize> = HashMap::new();
            for q in st.outstanding.values() {
                *per_queue.entry(q.clone()).or_default() += 1;
            }
            (
                st.waiting_since.map(|t| t.elapsed()),
                st.last_delivery.elapsed(),
                st.consuming.clone(),
                per_queue,
            )
        };
        let Some(stalled_for) = stalled_for else {
            return;
        };
        if stalled_for < WATCHDOG_SILENCE || silent_for < WATCHDOG_SILENCE {
            return;
        }
        let prefetch = usize::from(self.options.prefetch);
        for q in consuming {
            if prefetch > 0 && outstanding.get(&q).copied().unwrap_or(0) >= prefetch {
                continue; // QoS is full with messages the worker holds: not a stall.
            }
            let Ok(ch) = link.conn.create_channel().await else {
                return;
            };
            let count = ch
                .queue_declare(
                    short(&q),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map(|d| d.message_count())
                .unwrap_or(0);
            let _ = ch.close(200, short("ok")).await;
            if count > 0 {
                warn!(queue = %q, waiting = count, silent_for = ?silent_for,
                    "watchdog: the consumer received nothing while messages wait; restarting the connection");
                self.lost(link.generation, "consumer stalled");
                return;
            }
        }
    }

    async fn temp_channel(&self) -> Result<(Arc<Link>, Channel)> {
        let link = self.link().await?;
        let ch = link.conn.create_channel().await?;
        Ok((link, ch))
    }
}

async fn pump(inner: Weak<Inner>, generation: u64, queue: String, mut consumer: lapin::Consumer) {
    while let Some(d) = consumer.next().await {
        let Some(inner) = inner.upgrade() else { return };
        match d {
            Ok(d) => inner.arrived(generation, &queue, d),
            Err(e) => {
                inner.lost(generation, &format!("consumer of {queue}: {e}"));
                return;
            }
        }
    }
    if let Some(inner) = inner.upgrade() {
        let still_wanted = inner
            .state
            .lock()
            .expect("state")
            .consuming
            .contains(&queue);
        if still_wanted {
            inner.lost(
                generation,
                &format!("RabbitMQ cancelled the consumer of {queue}"),
            );
        }
    }
}

fn to_delivery(generation: u64, queue: String, d: AmqpDelivery) -> Delivery {
    let message = table::decode_task(&d.properties, &d.data);
    Delivery {
        held: Held {
            tag: tag_of(generation, d.delivery_tag),
            queue,
            raw: d.data,
            exchange: d.exchange.as_str().to_string(),
            routing_key: d.routing_key.as_str().to_string(),
            redelivered: d.redelivered,
            amqp_properties: Some(Arc::new(d.properties)),
        },
        message,
    }
}

fn held_properties(held: &Held) -> BasicProperties {
    held.amqp_properties.as_deref().cloned().unwrap_or_default()
}

#[async_trait]
impl Broker for AmqpBroker {
    async fn declare(&self, queues: &[String]) -> Result<()> {
        let link = self.inner.link().await?;
        for q in queues {
            self.inner.declare_queue(&link, q).await?;
            self.inner
                .declared
                .lock()
                .expect("declared")
                .insert(q.clone());
        }
        Ok(())
    }

    async fn fetch(
        &self,
        queues: &[String],
        max: usize,
        acks: &[String],
        wait: Duration,
    ) -> Result<Vec<Delivery>> {
        let link = match self.inner.current() {
            Some(l) => l,
            None => {
                // Acks of a lost connection are moot: RabbitMQ requeues those messages (the caller retries
                // them; by then their generation is stale and they are dropped).
                return Err(BrokerError::NotConnected(
                    "no connection to RabbitMQ (reconnecting)".into(),
                ));
            }
        };
        self.ack(acks).await?;
        let changed = {
            let mut st = self.inner.state.lock().expect("state");
            let changed = st.consuming != queues;
            if changed {
                st.consuming = queues.to_vec();
            }
            changed
        };
        if changed {
            self.inner.start_consumers(&link, queues).await?;
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let generation = link.generation;
            let Some(taken) = self.inner.take(generation, queues, max) else {
                return Err(BrokerError::NotConnected(
                    "the RabbitMQ connection was lost".into(),
                ));
            };
            if !taken.is_empty() || !acks.is_empty() || max == 0 {
                return Ok(taken
                    .into_iter()
                    .map(|(q, d)| to_delivery(generation, q, d))
                    .collect());
            }
            {
                let mut st = self.inner.state.lock().expect("state");
                st.waiting_since.get_or_insert_with(Instant::now);
            }
            tokio::select! {
                _ = self.inner.arrived.notified() => {}
                _ = tokio::time::sleep_until(deadline) => return Ok(Vec::new()),
            }
        }
    }

    async fn ack(&self, tags: &[String]) -> Result<()> {
        if tags.is_empty() {
            return Ok(());
        }
        let current = self.inner.current_tags(tags);
        if current.is_empty() {
            return Ok(());
        }
        // basic.ack has no reply: queue the frames and go on (they leave in settling order).
        self.inner.enqueue_frames(current, true, false, true).await
    }

    async fn flush_acks(&self) -> Result<()> {
        // An empty batch that reports back: settles leave in order, so every earlier ack was sent.
        self.inner
            .enqueue_frames(Vec::new(), true, true, false)
            .await
    }

    async fn requeue(&self, held: &[&Held], _front: bool) -> Result<usize> {
        let tags: Vec<String> = held.iter().map(|h| h.tag.clone()).collect();
        let current = self.inner.current_tags(&tags);
        // basic.reject(requeue=True): back to its place in the queue, redelivered=1 (spec §3.3).
        self.inner.enqueue(current, false).await?;
        Ok(held.len())
    }

    async fn dead_letter(&self, held: &Held, reason: &str) -> Result<()> {
        let queue = format!("celeriac.deadletter.{}", held.queue);
        let (link, ch) = self.inner.temp_channel().await?;
        ch.queue_declare(short(&queue), durable_queue(), self.inner.own_queue_args())
            .await?;
        let _ = ch.close(200, short("ok")).await;
        drop(link);
        let mut props = held_properties(held);
        let mut headers = props.headers().clone().unwrap_or_default();
        headers.insert(
            short("x-celeriac-reason"),
            AMQPValue::LongString(LongString::from(reason.as_bytes())),
        );
        headers.insert(
            short("x-celeriac-queue"),
            AMQPValue::LongString(LongString::from(held.queue.as_bytes())),
        );
        headers.insert(
            short("x-celeriac-at"),
            AMQPValue::LongString(LongString::from(
                celeriac_protocol::time::rfc3339_micros(chrono::Utc::now()).as_bytes(),
            )),
        );
        props = props.with_headers(headers).with_delivery_mode(2);
        self.inner
            .publish_confirmed("", &queue, &held.raw, props, &queue)
            .await?;
        self.ack(std::slice::from_ref(&held.tag)).await
    }

    async fn renew(&self, _tags: &[String]) -> Result<()> {
        Ok(()) // RabbitMQ holds unacked messages until their channel closes: no lease to renew.
    }

    async fn restore_visible(&self) -> Result<usize> {
        Ok(0) // RabbitMQ requeues a dead consumer's messages itself.
    }

    fn holds_cost_prefetch(&self) -> bool {
        true
    }

    async fn park(&self, held: &Held, due: chrono::DateTime<chrono::Utc>) -> Result<bool> {
        let Some((generation, _)) = parse_tag(&held.tag) else {
            return Ok(false);
        };
        let link = self.inner.link().await?;
        if link.generation != generation {
            return Ok(false); // its channel is gone: RabbitMQ already requeued it
        }
        self.inner.ensure_delay(&link, &held.queue).await?;
        let secs = (due - chrono::Utc::now()).num_seconds().max(1) as u64;
        let rk = topology::delay_routing_key(secs, &held.queue);
        let props = held_properties(held);
        self.inner
            .publish_confirmed(
                &topology::level_name(topology::DELAY_BITS - 1),
                &rk,
                &held.raw,
                props,
                &held.queue,
            )
            .await?;
        self.ack(std::slice::from_ref(&held.tag)).await?;
        Ok(true)
    }

    async fn unpark_due(
        &self,
        _queues: &[String],
        _by: chrono::DateTime<chrono::Utc>,
    ) -> Result<usize> {
        Ok(0) // RabbitMQ dead-letters parked messages back into their queue when due.
    }

    async fn parked(&self, _queue: &str) -> Result<u64> {
        Ok(0)
    }

    async fn take_shared_token(
        &self,
        _key: &str,
        _interval: Duration,
        _burst: u32,
    ) -> Result<Option<Duration>> {
        Err(BrokerError::Unsupported(
            "cluster-wide rate limits need a Redis broker; with RabbitMQ each worker limits on its own",
        ))
    }

    async fn publish_events(&self, events: &[(String, Vec<u8>)]) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let link = self.inner.link().await?;
        self.inner
            .ensure_exchange(&link, topology::EVENT_EXCHANGE, ExchangeKind::Topic, true)
            .await?;
        for (rk, envelope) in events {
            let Ok((body, props)) = table::from_envelope(envelope, 1) else {
                continue;
            };
            link.consume
                .basic_publish(
                    short(topology::EVENT_EXCHANGE),
                    short(rk),
                    BasicPublishOptions::default(),
                    &body,
                    props,
                )
                .await?;
        }
        Ok(())
    }

    async fn event_stream(&self) -> Result<futures::stream::BoxStream<'static, Vec<u8>>> {
        let link = self.inner.link().await?;
        let ch = link.conn.create_channel().await?;
        let queue = format!("celeryev.{}", uuid::Uuid::new_v4());
        // As Celery's event receiver: transient, expires 60 s after its consumer left, events live 5 s.
        let mut args = Map::new();
        args.insert("x-expires".into(), 60_000.into());
        args.insert("x-message-ttl".into(), 5_000.into());
        let consumer = transient_consumer(
            &ch,
            topology::EVENT_EXCHANGE,
            ExchangeKind::Topic,
            true,
            &queue,
            "#",
            &args,
        )
        .await?;
        Ok(
            futures::stream::unfold((consumer, ch), |(mut consumer, ch)| async move {
                match consumer.next().await {
                    Some(Ok(d)) => Some((
                        table::to_envelope(
                            &d.properties,
                            &d.data,
                            d.exchange.as_str(),
                            d.routing_key.as_str(),
                        ),
                        (consumer, ch),
                    )),
                    _ => None,
                }
            })
            .boxed(),
        )
    }

    async fn control_requests(&self) -> Result<futures::stream::BoxStream<'static, Vec<u8>>> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.inner.pidbox.lock().expect("pidbox") = Some(tx);
        let link = self.inner.link().await?;
        self.inner.start_pidbox(&link).await?;
        Ok(
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) })
                .boxed(),
        )
    }

    async fn control_reply(&self, routing_key: &str, envelope: &[u8]) -> Result<()> {
        let link = self.inner.link().await?;
        self.inner
            .ensure_exchange(&link, topology::REPLY_EXCHANGE, ExchangeKind::Direct, false)
            .await?;
        let (body, props) = table::from_envelope(envelope, 1)?;
        link.consume
            .basic_publish(
                short(topology::REPLY_EXCHANGE),
                short(routing_key),
                BasicPublishOptions::default(),
                &body,
                props,
            )
            .await?;
        Ok(())
    }

    async fn add_revoked(&self, ids: &[String], keep: Duration) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let (_link, ch) = self.inner.temp_channel().await?;
        ch.queue_declare(
            short(topology::REVOKED_QUEUE),
            durable_queue(),
            self.inner.own_queue_args(),
        )
        .await?;
        let _ = ch.close(200, short("ok")).await;
        for id in ids {
            let props = BasicProperties::default()
                .with_content_type("text/plain".into())
                .with_delivery_mode(2)
                .with_expiration(keep.as_millis().to_string().as_str().into());
            self.inner
                .publish_confirmed(
                    "",
                    topology::REVOKED_QUEUE,
                    id.as_bytes(),
                    props,
                    topology::REVOKED_QUEUE,
                )
                .await?;
        }
        Ok(())
    }

    async fn revoked(&self) -> Result<Vec<String>> {
        let (_link, ch) = self.inner.temp_channel().await?;
        ch.queue_declare(
            short(topology::REVOKED_QUEUE),
            durable_queue(),
            self.inner.own_queue_args(),
        )
        .await?;
        let mut ids = Vec::new();
        // Read without acknowledging; closing the channel puts every message back for the next reader.
        while let Some(m) = ch
            .basic_get(short(topology::REVOKED_QUEUE), BasicGetOptions::default())
            .await?
        {
            ids.push(String::from_utf8_lossy(&m.delivery.data).into_owned());
        }
        let _ = ch.close(200, short("ok")).await;
        Ok(ids)
    }

    async fn control_call(
        &self,
        envelope: &[u8],
        oid: &str,
        timeout: Duration,
        limit: Option<usize>,
    ) -> Result<Vec<Vec<u8>>> {
        let (link, ch) = self.inner.temp_channel().await?;
        let queue = format!("{oid}.reply.celery.pidbox");
        let mut consumer = transient_consumer(
            &ch,
            topology::REPLY_EXCHANGE,
            ExchangeKind::Direct,
            false,
            &queue,
            oid,
            &topology::control_queue_args(),
        )
        .await?;
        ch.exchange_declare(
            short(topology::PIDBOX_EXCHANGE),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
        let (body, props) = table::from_envelope(envelope, 2)?;
        ch.basic_publish(
            short(topology::PIDBOX_EXCHANGE),
            short(""),
            BasicPublishOptions::default(),
            &body,
            props,
        )
        .await?;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut replies = Vec::new();
        loop {
            if limit.is_some_and(|l| replies.len() >= l) {
                break;
            }
            tokio::select! {
                m = consumer.next() => match m {
                    Some(Ok(d)) => replies.push(table::to_envelope(&d.properties, &d.data, d.exchange.as_str(), d.routing_key.as_str())),
                    _ => break,
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        let _ = ch
            .queue_delete(short(&queue), QueueDeleteOptions::default())
            .await;
        let _ = ch.close(200, short("ok")).await;
        drop(link);
        Ok(replies)
    }

    async fn publish(&self, message: &TaskMessage, queue: &str) -> Result<()> {
        let first = !self
            .inner
            .declared
            .lock()
            .expect("declared")
            .contains(queue);
        if first {
            self.declare(&[queue.to_string()]).await?;
        }
        let (body, props) = table::encode_task(message);
        // Celery converts the direct `celery` exchange to the default exchange (spec §3.2).
        self.inner
            .publish_confirmed("", queue, &body, props, queue)
            .await
    }

    async fn queue_length(&self, queue: &str) -> Result<u64> {
        let (_link, ch) = self.inner.temp_channel().await?;
        let res = ch
            .queue_declare(
                short(queue),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        match res {
            Ok(q) => {
                let _ = ch.close(200, short("ok")).await;
                Ok(u64::from(q.message_count()))
            }
            Err(e) if is_not_found(&e) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    async fn purge(&self, queue: &str) -> Result<u64> {
        let (_link, ch) = self.inner.temp_channel().await?;
        match ch
            .queue_purge(short(queue), QueuePurgeOptions::default())
            .await
        {
            Ok(n) => {
                let _ = ch.close(200, short("ok")).await;
                Ok(u64::from(n))
            }
            Err(e) if is_not_found(&e) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    async fn ping(&self) -> Result<()> {
        match self.inner.current() {
            Some(_) => Ok(()),
            None => Err(BrokerError::NotConnected(
                "no connection to RabbitMQ (reconnecting)".into(),
            )),
        }
    }

    fn is_connected(&self) -> bool {
        self.inner.current().is_some()
    }

    fn transport(&self) -> &'static str {
        "amqp"
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
