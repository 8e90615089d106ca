//! Celery events from this worker: `worker-online`/`heartbeat`/`offline` always (heartbeat every 2 s), and
//! task events (`task-received`, `-started`, `-succeeded`, `-failed`, `-retried`, `-revoked`, `-rejected`) when
//! enabled (`-E`, `worker_send_task_events`), so `celery events`, Flower and celery-exporter see celeriac
//! workers. Events are queued without blocking the task path and published in pipelined batches.

use celeriac_broker::prelude::*;
use celeriac_protocol::event::{self, EventHeader, EventKind};
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// Events waiting to be published: `(type, fields)`.
pub type EventQueue = mpsc::UnboundedReceiver<(EventKind, Map<String, Value>)>;

/// Heartbeat interval (Celery's `freq`).
pub const HEARTBEAT: Duration = Duration::from_secs(2);

/// The worker's event dispatcher.
#[derive(Debug)]
pub struct Events {
    hostname: String,
    task_events: AtomicBool,
    clock: AtomicU64,
    /// Tasks finished.
    pub processed: AtomicU64,
    /// Tasks running.
    pub active: AtomicI64,
    tx: mpsc::UnboundedSender<(EventKind, Map<String, Value>)>,
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

fn loadavg() -> Value {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let v: Vec<f64> = text
        .split_whitespace()
        .take(3)
        .filter_map(|x| x.parse::<f64>().ok())
        .map(|x| (x * 100.0).round() / 100.0)
        .collect();
    json!(if v.len() == 3 { v } else { vec![0.0, 0.0, 0.0] })
}

impl Events {
    /// A dispatcher and the receiving end its publisher drains.
    pub fn new(hostname: &str, task_events: bool) -> (Arc<Self>, EventQueue) {
        let (tx, rx) = mpsc::unbounded_channel();
        let events = Arc::new(Self {
            hostname: hostname.to_string(),
            task_events: AtomicBool::new(task_events),
            clock: AtomicU64::new(0),
            processed: AtomicU64::new(0),
            active: AtomicI64::new(0),
            tx,
        });
        (events, rx)
    }

    /// Turns task events on or off (`enable_events` / `disable_events`); returns the previous setting.
    pub fn set_task_events(&self, on: bool) -> bool {
        self.task_events.swap(on, Ordering::Relaxed)
    }

    /// Whether task events are sent.
    pub fn task_events(&self) -> bool {
        self.task_events.load(Ordering::Relaxed)
    }

    /// A task event (dropped unless task events are enabled). `fields` come in Celery's order.
    pub fn task(&self, kind: EventKind, fields: Vec<(&str, Value)>) {
        if self.task_events() {
            let _ = self.tx.send((
                kind,
                fields
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
            ));
        }
    }

    /// A worker event with the current counters.
    pub fn worker(&self, kind: EventKind, freq: f64) {
        let mut f = Map::new();
        f.insert("freq".into(), json!(freq));
        f.insert(
            "active".into(),
            json!(self.active.load(Ordering::Relaxed).max(0)),
        );
        f.insert(
            "processed".into(),
            json!(self.processed.load(Ordering::Relaxed)),
        );
        f.insert("loadavg".into(), loadavg());
        f.insert("sw_ident".into(), json!("celeriac"));
        f.insert("sw_ver".into(), json!(env!("CARGO_PKG_VERSION")));
        f.insert(
            "sw_sys".into(),
            json!(std::env::consts::OS.replace("linux", "Linux")),
        );
        let _ = self.tx.send((kind, f));
    }

    fn envelope(&self, kind: EventKind, fields: &Map<String, Value>) -> (String, Vec<u8>) {
        let header = EventHeader {
            hostname: &self.hostname,
            utcoffset: 0.0,
            pid: crate::pid(),
            clock: self.clock.fetch_add(1, Ordering::Relaxed) + 1,
            timestamp: now(),
        };
        let rk = kind.routing_key();
        let body = event::body(&header, kind, fields);
        let tag = uuid::Uuid::new_v4().to_string();
        let env = event::envelope(&body, &self.hostname, rk, &tag);
        (rk.to_string(), env)
    }
}

/// Publishes queued events in batches until the dispatcher is dropped, and a heartbeat every 2 s until
/// `stop`; then flushes what is left.
pub async fn publisher(
    events: Arc<Events>,
    mut rx: EventQueue,
    broker: Arc<dyn Broker>,
    stop: CancellationToken,
) {
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    heartbeat.tick().await;
    let mut buf = Vec::with_capacity(256);
    loop {
        tokio::select! {
            n = rx.recv_many(&mut buf, 256) => {
                if n == 0 {
                    break;
                }
            }
            _ = heartbeat.tick() => {
                events.worker(EventKind::WorkerHeartbeat, HEARTBEAT.as_secs_f64());
                continue;
            }
            _ = stop.cancelled() => {
                while let Ok(e) = rx.try_recv() {
                    buf.push(e);
                }
                events.worker(EventKind::WorkerOffline, HEARTBEAT.as_secs_f64());
                while let Ok(e) = rx.try_recv() {
                    buf.push(e);
                }
                send(&events, &broker, &mut buf).await;
                break;
            }
        }
        send(&events, &broker, &mut buf).await;
    }
}

async fn send(
    events: &Events,
    broker: &Arc<dyn Broker>,
    buf: &mut Vec<(EventKind, Map<String, Value>)>,
) {
    let batch: Vec<(String, Vec<u8>)> = buf
        .drain(..)
        .map(|(kind, f)| events.envelope(kind, &f))
        .collect();
    if let Err(e) = broker.publish_events(&batch).await {
        warn!(error = %e, count = batch.len(), "publishing events failed");
    }
}
