//! Per-worker Prometheus metrics with celery-exporter's names and labels (so its Grafana dashboards work),
//! and the `/metrics` + `/health` HTTP endpoints. The series the exporter reports once per cluster
//! (`celery_worker_up` from heartbeats, `celery_queue_length` per queue, `celery_task_sent_total`) come from
//! flower-compat, which sees every worker; a worker reports its own view as `celeriac_worker_up` and
//! `celeriac_worker_queue_length`, so the dashboards' sums never count a queue once per consumer. `/health` answers 200 only while the consumer has talked
//! to the broker recently: a worker that silently stopped consuming shows up as unhealthy.

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Labels of per-task series (celery-exporter's).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskLabels {
    /// Task name.
    pub name: String,
    /// Worker node name.
    pub hostname: String,
    /// Queue the task came from.
    pub queue_name: String,
}

/// Labels of `celery_task_failed_total`: the task's, plus the exception's class name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailedLabels {
    /// Task name.
    pub name: String,
    /// Worker node name.
    pub hostname: String,
    /// Queue the task came from.
    pub queue_name: String,
    /// The exception's class name (`ValueError`), as celery-exporter writes it.
    pub exception: String,
}

/// Labels of per-worker series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabels {
    /// Worker node name.
    pub hostname: String,
}

/// Labels of per-peer series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    /// `broker`, `result_backend`, `postgres`, `smtp`, `stripe`, `shop:<host>`.
    pub peer: String,
}

/// Labels of per-queue series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    /// Queue name.
    pub queue_name: String,
}

type RuntimeFamily = Family<TaskLabels, Histogram, fn() -> Histogram>;

fn runtime_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        300.0,
    ])
}

/// Which task counter to bump.
#[derive(Debug, Clone, Copy)]
pub enum TaskEvent {
    /// `celery_task_received_total`.
    Received,
    /// `celery_task_started_total`.
    Started,
    /// `celery_task_succeeded_total`.
    Succeeded,
    /// `celery_task_failed_total` (counted with its exception by [`Metrics::failed`]).
    Failed,
    /// `celery_task_retried_total`.
    Retried,
    /// `celery_task_rejected_total`.
    Rejected,
    /// `celery_task_revoked_total`.
    Revoked,
}

/// The series of one (task, queue) pair, looked up once and reused.
struct TaskSeries {
    counters: [Counter; 7],
    runtime: Histogram,
}

/// The worker's metrics.
pub struct Metrics {
    registry: Registry,
    hostname: String,
    counters: [Family<TaskLabels, Counter>; 7],
    failed: Family<FailedLabels, Counter>,
    runtime: RuntimeFamily,
    /// task name → queue → series; hits allocate nothing.
    series: std::sync::RwLock<
        std::collections::HashMap<String, std::collections::HashMap<String, Arc<TaskSeries>>>,
    >,
    /// `celeriac_worker_up`.
    pub worker_up: Gauge,
    /// `celery_worker_tasks_active`.
    pub tasks_active: Gauge,
    /// `celeriac_worker_queue_length{queue_name}` (all priority lists summed), as this worker reads it.
    pub queue_length: Family<QueueLabels, Gauge>,
    /// `celeriac_worker_prefetched`: messages held unacked by this worker.
    pub prefetched: Gauge,
    /// `celeriac_worker_prefetch_limit`: the most it may hold.
    pub prefetch_limit: Gauge,
    /// `celeriac_worker_dead_lettered_total`.
    pub dead_lettered: Counter,
    /// `celeriac_peer_outage_seconds{peer}`: how long the peer has been down now (0 when up).
    pub peer_outage: Family<PeerLabels, Gauge<f64, AtomicU64>>,
    /// `celeriac_peer_up{peer}`.
    pub peer_up: Family<PeerLabels, Gauge>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("hostname", &self.hostname)
            .finish()
    }
}

impl Metrics {
    /// Creates and registers every series.
    pub fn new(hostname: &str) -> Self {
        Self::with_registry(hostname, Registry::default())
    }

    /// Creates every series in `registry`, which may already hold other series (a task family's): the
    /// worker's `/metrics` serves them all.
    pub fn with_registry(hostname: &str, mut registry: Registry) -> Self {
        let counters: [Family<TaskLabels, Counter>; 7] = Default::default();
        let names = [
            ("celery_task_received", "Tasks received by the worker"),
            ("celery_task_started", "Tasks started"),
            ("celery_task_succeeded", "Tasks that succeeded"),
            ("celery_task_failed", "Tasks that failed"),
            ("celery_task_retried", "Tasks retried"),
            ("celery_task_rejected", "Tasks rejected"),
            ("celery_task_revoked", "Tasks revoked or expired"),
        ];
        let failed = Family::<FailedLabels, Counter>::default();
        for (i, ((name, help), family)) in names.iter().zip(counters.iter()).enumerate() {
            if i == TaskEvent::Failed as usize {
                registry.register(*name, *help, failed.clone());
            } else {
                registry.register(*name, *help, family.clone());
            }
        }
        let runtime: RuntimeFamily = Family::new_with_constructor(runtime_histogram);
        registry.register(
            "celery_task_runtime",
            "Task runtime in seconds",
            runtime.clone(),
        );
        let host = WorkerLabels {
            hostname: hostname.to_string(),
        };
        let up_family = Family::<WorkerLabels, Gauge>::default();
        registry.register(
            "celeriac_worker_up",
            "1 while the worker runs (celery_worker_up, from heartbeats, is flower-compat's)",
            up_family.clone(),
        );
        let active_family = Family::<WorkerLabels, Gauge>::default();
        registry.register(
            "celery_worker_tasks_active",
            "Tasks running now",
            active_family.clone(),
        );
        let queue_length = Family::<QueueLabels, Gauge>::default();
        registry.register(
            "celeriac_worker_queue_length",
            "Messages waiting in a queue this worker consumes (celery_queue_length, once per queue, is flower-compat's)",
            queue_length.clone(),
        );
        let prefetched_family = Family::<WorkerLabels, Gauge>::default();
        registry.register(
            "celeriac_worker_prefetched",
            "Messages held unacknowledged",
            prefetched_family.clone(),
        );
        let limit_family = Family::<WorkerLabels, Gauge>::default();
        registry.register(
            "celeriac_worker_prefetch_limit",
            "Most messages held unacknowledged",
            limit_family.clone(),
        );
        let dead_lettered = Counter::default();
        registry.register(
            "celeriac_worker_dead_lettered",
            "Messages moved to a dead-letter list",
            dead_lettered.clone(),
        );
        let peer_outage = Family::<PeerLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "celeriac_peer_outage_seconds",
            "Seconds an outside peer has been down now (0 when up)",
            peer_outage.clone(),
        );
        let peer_up = Family::<PeerLabels, Gauge>::default();
        registry.register(
            "celeriac_peer_up",
            "Whether an outside peer answers (1) or not (0)",
            peer_up.clone(),
        );
        // Per-worker gauges share one series each; keep handles to them.
        let worker_up = up_family.get_or_create(&host).clone();
        let tasks_active = active_family.get_or_create(&host).clone();
        let prefetched = prefetched_family.get_or_create(&host).clone();
        let prefetch_limit = limit_family.get_or_create(&host).clone();
        Self {
            registry,
            hostname: hostname.to_string(),
            counters,
            failed,
            runtime,
            series: Default::default(),
            worker_up,
            tasks_active,
            queue_length,
            prefetched,
            prefetch_limit,
            dead_lettered,
            peer_outage,
            peer_up,
        }
    }

    fn labels(&self, name: &str, queue: &str) -> TaskLabels {
        TaskLabels {
            name: name.to_string(),
            hostname: self.hostname.clone(),
            queue_name: queue.to_string(),
        }
    }

    fn series(&self, name: &str, queue: &str) -> Arc<TaskSeries> {
        if let Some(s) = self
            .series
            .read()
            .expect("series")
            .get(name)
            .and_then(|q| q.get(queue))
        {
            return Arc::clone(s);
        }
        let labels = self.labels(name, queue);
        let s = Arc::new(TaskSeries {
            counters: std::array::from_fn(|i| self.counters[i].get_or_create(&labels).clone()),
            runtime: self.runtime.get_or_create(&labels).clone(),
        });
        let mut map = self.series.write().expect("series");
        map.entry(name.to_string())
            .or_default()
            .insert(queue.to_string(), Arc::clone(&s));
        s
    }

    /// Tasks started per task name (`inspect stats` `total`).
    pub fn totals(&self) -> std::collections::BTreeMap<String, u64> {
        let series = self.series.read().expect("series");
        series
            .iter()
            .map(|(name, queues)| {
                (
                    name.clone(),
                    queues
                        .values()
                        .map(|s| s.counters[TaskEvent::Started as usize].get())
                        .sum(),
                )
            })
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// Creates a task's series at 0 before its first event.
    pub fn init_task(&self, name: &str, queue: &str) {
        self.series(name, queue);
    }

    /// Bumps a task counter.
    pub fn task(&self, event: TaskEvent, name: &str, queue: &str) {
        self.series(name, queue).counters[event as usize].inc();
    }

    /// Counts a failure with its exception's class name (`celery_task_failed_total{exception}`).
    pub fn failed(&self, name: &str, queue: &str, exception: &str) {
        self.task(TaskEvent::Failed, name, queue);
        let labels = self.labels(name, queue);
        self.failed
            .get_or_create(&FailedLabels {
                name: labels.name,
                hostname: labels.hostname,
                queue_name: labels.queue_name,
                exception: exception.to_string(),
            })
            .inc();
    }

    /// Records a task runtime.
    pub fn runtime(&self, name: &str, queue: &str, seconds: f64) {
        self.series(name, queue).runtime.observe(seconds);
    }

    /// OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// When the consumer last talked to the broker.
#[derive(Debug)]
pub struct Health {
    last_contact_ms: AtomicU64,
    /// Longer than this without contact is unhealthy.
    pub max_silence: Duration,
    /// Every outside peer's state (the broker is one).
    pub peers: Arc<celeriac_task::Peers>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

impl Health {
    /// Unhealthy until the first contact.
    pub fn new(max_silence: Duration) -> Self {
        Self::with_peers(max_silence, Arc::default())
    }

    /// Unhealthy until the first contact; also unhealthy while any of `peers` is down.
    pub fn with_peers(max_silence: Duration, peers: Arc<celeriac_task::Peers>) -> Self {
        Self {
            last_contact_ms: AtomicU64::new(0),
            max_silence,
            peers,
        }
    }

    /// Records a successful round trip to the broker.
    pub fn contact(&self) {
        self.last_contact_ms.store(now_ms(), Ordering::Relaxed);
        self.peers.up("broker");
    }

    /// Records that the broker connection is down: unhealthy until the next contact.
    pub fn lost(&self) {
        self.last_contact_ms.store(0, Ordering::Relaxed);
        self.peers.down("broker", "the broker connection is down");
    }

    /// Milliseconds since the last contact.
    pub fn silence(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.last_contact_ms.load(Ordering::Relaxed)))
    }

    /// True while the broker was reached recently.
    pub fn is_healthy(&self) -> bool {
        self.silence() <= self.max_silence
    }
}

#[derive(Clone)]
struct HttpState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// The `/metrics` and `/health` router.
pub fn router(metrics: Arc<Metrics>, health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(serve_metrics))
        .route("/health", get(serve_health))
        .with_state(HttpState { metrics, health })
}

async fn serve_metrics(State(s): State<HttpState>) -> impl IntoResponse {
    for (peer, outage) in s.health.peers.snapshot() {
        let labels = PeerLabels { peer };
        s.metrics.peer_outage.get_or_create(&labels).set(outage);
        s.metrics
            .peer_up
            .get_or_create(&labels)
            .set(i64::from(outage == 0.0));
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

async fn serve_health(State(s): State<HttpState>) -> impl IntoResponse {
    let silence = s.health.silence().as_secs_f64();
    let outages: Vec<String> = s
        .health
        .peers
        .outages()
        .into_iter()
        .filter(|o| o.peer != "broker")
        .map(|o| {
            format!(
                "{} down for {:.1}s: {}",
                o.peer,
                o.since.as_secs_f64(),
                o.error
            )
        })
        .collect();
    if s.health.is_healthy() && outages.is_empty() {
        (
            StatusCode::OK,
            format!("ok: broker reached {silence:.1}s ago\n"),
        )
    } else {
        let mut body = String::from("unhealthy:\n");
        if !s.health.is_healthy() {
            body.push_str(&format!("broker: no contact for {silence:.1}s\n"));
        }
        for o in outages {
            body.push_str(&o);
            body.push('\n');
        }
        (StatusCode::SERVICE_UNAVAILABLE, body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exporter_names_and_labels() {
        let m = Metrics::new("w1@host");
        m.task(TaskEvent::Received, "bench.add", "realtime");
        m.task(TaskEvent::Succeeded, "bench.add", "realtime");
        m.task(TaskEvent::Succeeded, "bench.add", "realtime");
        m.runtime("bench.add", "realtime", 0.002);
        m.worker_up.set(1);
        m.queue_length
            .get_or_create(&QueueLabels {
                queue_name: "bulk".into(),
            })
            .set(7);
        let text = m.encode();
        assert!(text.contains(r#"celery_task_received_total{name="bench.add",hostname="w1@host",queue_name="realtime"} 1"#), "{text}");
        assert!(text.contains(r#"celery_task_succeeded_total{name="bench.add",hostname="w1@host",queue_name="realtime"} 2"#));
        assert!(text.contains(r#"celery_task_runtime_count{name="bench.add",hostname="w1@host",queue_name="realtime"} 1"#));
        assert!(text.contains(r#"celeriac_worker_up{hostname="w1@host"} 1"#));
        assert!(text.contains(r#"celeriac_worker_queue_length{queue_name="bulk"} 7"#));
        // Once per cluster, from flower-compat: never from a worker.
        assert!(
            !text
                .lines()
                .any(|l| l.starts_with("celery_worker_up") || l.starts_with("celery_queue_length"))
        );
        m.failed("bench.fail", "realtime", "ValueError");
        m.failed("bench.fail", "realtime", "ValueError");
        m.failed("bench.fail", "realtime", "KeyError");
        let text = m.encode();
        assert!(text.contains(r#"celery_task_failed_total{name="bench.fail",hostname="w1@host",queue_name="realtime",exception="ValueError"} 2"#), "{text}");
        assert!(text.contains(r#"celery_task_failed_total{name="bench.fail",hostname="w1@host",queue_name="realtime",exception="KeyError"} 1"#), "{text}");
    }

    #[test]
    fn health_needs_recent_contact() {
        let h = Health::new(Duration::from_secs(10));
        assert!(!h.is_healthy());
        h.contact();
        assert!(h.is_healthy());
        h.lost();
        assert!(!h.is_healthy());
    }
}
