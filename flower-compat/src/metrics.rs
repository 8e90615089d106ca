//! Flower's Prometheus metrics, same names and labels (`flower_events_total{task,type,worker}`,
//! `flower_task_runtime_seconds`, `flower_task_prefetch_time_seconds`, `flower_worker_prefetched_tasks`,
//! `flower_worker_online`, `flower_worker_number_of_currently_executing_tasks`), plus queue lengths and
//! worker concurrency; with the worker label switched off every series drops it (one series per task
//! instead of one per task and worker).
//!
//! It is also the cluster's celery-exporter: the series that exporter derives from the event stream and the
//! broker, and which no single worker can report alone, come from here once each: `celery_worker_up{hostname}`
//! (1 while heartbeats arrive, 0 once they stop), `celery_queue_length{queue_name}` (one series per queue, so
//! the dashboards' sums are right) and `celery_task_sent_total{name,hostname,queue_name}` (from `task-sent`).
//! The per-task counters stay with the workers that run the tasks.

use crate::state::TaskRecord;
use celeriac_protocol::event::EventKind;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

type Labels = Vec<(String, String)>;
type RuntimeFamily = Family<Labels, Histogram, fn() -> Histogram>;

fn runtime_histogram() -> Histogram {
    // Flower's buckets (prometheus_client's defaults in Python).
    Histogram::new([
        0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    ])
}

/// The metrics and their registry.
pub struct FlowerMetrics {
    registry: Registry,
    events: Family<Labels, Counter>,
    runtime: RuntimeFamily,
    prefetch_time: Family<Labels, Gauge<f64, AtomicU64>>,
    prefetched: Family<Labels, Gauge>,
    /// `flower_worker_online{worker}`.
    pub online: Family<Labels, Gauge>,
    /// `flower_worker_number_of_currently_executing_tasks{worker}`.
    pub executing: Family<Labels, Gauge>,
    /// `celeriac_flower_queue_length{queue}`.
    pub queue_length: Family<Labels, Gauge>,
    /// `celeriac_flower_worker_concurrency{worker}`.
    pub concurrency: Family<Labels, Gauge>,
    /// celery-exporter's `celery_worker_up{hostname}`.
    pub worker_up: Family<Labels, Gauge>,
    /// celery-exporter's `celery_queue_length{queue_name}`.
    pub exporter_queue_length: Family<Labels, Gauge>,
    /// celery-exporter's `celery_task_sent_total{name,hostname,queue_name}`.
    sent: Family<Labels, Counter>,
}

impl Default for FlowerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl FlowerMetrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let events = Family::<Labels, Counter>::default();
        let runtime = RuntimeFamily::new_with_constructor(runtime_histogram as fn() -> Histogram);
        let prefetch_time = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        let prefetched = Family::<Labels, Gauge>::default();
        let online = Family::<Labels, Gauge>::default();
        let executing = Family::<Labels, Gauge>::default();
        let queue_length = Family::<Labels, Gauge>::default();
        let concurrency = Family::<Labels, Gauge>::default();
        let worker_up = Family::<Labels, Gauge>::default();
        let exporter_queue_length = Family::<Labels, Gauge>::default();
        let sent = Family::<Labels, Counter>::default();
        registry.register("flower_events", "Number of events", events.clone());
        registry.register(
            "flower_task_runtime_seconds",
            "Task runtime",
            runtime.clone(),
        );
        registry.register(
            "flower_task_prefetch_time_seconds",
            "The time the task spent waiting at the worker to be executed since it was received by the worker",
            prefetch_time.clone(),
        );
        registry.register(
            "flower_worker_prefetched_tasks",
            "Number of tasks of given type prefetched at a worker",
            prefetched.clone(),
        );
        registry.register(
            "flower_worker_online",
            "Worker online status",
            online.clone(),
        );
        registry.register(
            "flower_worker_number_of_currently_executing_tasks",
            "Number of tasks currently executing at a worker",
            executing.clone(),
        );
        registry.register(
            "celeriac_flower_queue_length",
            "Messages waiting in a queue",
            queue_length.clone(),
        );
        registry.register(
            "celeriac_flower_worker_concurrency",
            "Concurrency (pool size) of a worker",
            concurrency.clone(),
        );
        registry.register(
            "celery_worker_up",
            "Indicates if a worker has recently sent a heartbeat",
            worker_up.clone(),
        );
        registry.register(
            "celery_queue_length",
            "The number of message in broker queue",
            exporter_queue_length.clone(),
        );
        registry.register(
            "celery_task_sent",
            "Sent when a task message is published",
            sent.clone(),
        );
        Self {
            registry,
            events,
            runtime,
            prefetch_time,
            prefetched,
            online,
            executing,
            queue_length,
            concurrency,
            worker_up,
            exporter_queue_length,
            sent,
        }
    }

    /// Sets the cluster-level series of a worker (`alive`: heartbeats arriving) and of the queues.
    pub fn exporter_worker(&self, hostname: &str, alive: bool) {
        self.worker_up
            .get_or_create(&vec![("hostname".into(), hostname.to_string())])
            .set(i64::from(alive));
    }

    /// Sets `celery_queue_length` and `celeriac_flower_queue_length` of a queue.
    pub fn queue(&self, queue: &str, length: u64) {
        let n = i64::try_from(length).unwrap_or(i64::MAX);
        self.queue_length
            .get_or_create(&vec![("queue".into(), queue.to_string())])
            .set(n);
        self.exporter_queue_length
            .get_or_create(&vec![("queue_name".into(), queue.to_string())])
            .set(n);
    }

    /// Label set of a worker series.
    pub fn worker_labels(worker: &str) -> Labels {
        vec![("worker".into(), worker.to_string())]
    }

    /// Counts a task event after it was applied to `task`, as Flower's `observe_task`: the worker label is
    /// the event's hostname (the client's for `task-sent`); ETA tasks and tasks never received only count
    /// as events.
    pub fn observe(
        &self,
        event: &serde_json::Map<String, serde_json::Value>,
        task: &TaskRecord,
        with_worker: bool,
    ) {
        use serde_json::Value;
        let kind = event
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let name = event
            .get("name")
            .and_then(Value::as_str)
            .map(str::to_string)
            .or_else(|| task.name.clone())
            .unwrap_or_default();
        let worker = event
            .get("hostname")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let series = |extra: Option<(&str, &str)>| {
            let mut l = vec![("task".to_string(), name.clone())];
            if let Some((k, v)) = extra {
                l.push((k.to_string(), v.to_string()));
            }
            if with_worker {
                l.push(("worker".to_string(), worker.clone()));
            }
            l
        };
        self.events
            .get_or_create(&series(Some(("type", kind))))
            .inc();
        let known = EventKind::parse(kind);
        if known == Some(EventKind::TaskSent) {
            // As celery-exporter labels it: the sender's hostname, the queue it was routed to.
            let queue = ["queue", "routing_key"]
                .iter()
                .find_map(|k| event.get(*k).and_then(Value::as_str))
                .unwrap_or_default();
            self.sent
                .get_or_create(&vec![
                    ("name".into(), name.clone()),
                    ("hostname".into(), worker.clone()),
                    ("queue_name".into(), queue.to_string()),
                ])
                .inc();
        }
        let plain = series(None);
        if let Some(r) = event
            .get("runtime")
            .and_then(Value::as_f64)
            .filter(|r| *r != 0.0)
        {
            self.runtime.get_or_create(&plain).observe(r);
        }
        if task.eta.is_some() || task.received.is_none() {
            return;
        }
        match known {
            Some(EventKind::TaskReceived) => {
                self.prefetched.get_or_create(&plain).inc();
            }
            Some(EventKind::TaskStarted) => {
                if let (Some(started), Some(received)) = (task.started, task.received) {
                    self.prefetch_time
                        .get_or_create(&plain)
                        .set(started - received);
                    self.prefetched.get_or_create(&plain).dec();
                }
            }
            Some(EventKind::TaskSucceeded | EventKind::TaskFailed) if task.started.is_some() => {
                self.prefetch_time.get_or_create(&plain).set(0.0);
            }
            Some(EventKind::TaskRevoked | EventKind::TaskRejected) if task.started.is_none() => {
                self.prefetched.get_or_create(&plain).dec();
            }
            _ => {}
        }
    }

    /// The OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flower_names_with_and_without_the_worker_label() {
        let m = FlowerMetrics::new();
        let t = TaskRecord {
            name: Some("tasks.add".into()),
            worker: Some("w1@vm".into()),
            runtime: Some(0.02),
            ..TaskRecord::default()
        };
        let ev =
            serde_json::json!({"type": "task-succeeded", "hostname": "w1@vm", "runtime": 0.02});
        let ev = ev.as_object().unwrap();
        m.observe(ev, &t, true);
        m.observe(ev, &t, false);
        let text = m.encode();
        assert!(
            text.contains(
                r#"flower_events_total{task="tasks.add",type="task-succeeded",worker="w1@vm"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"flower_events_total{task="tasks.add",type="task-succeeded"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"flower_task_runtime_seconds_count{task="tasks.add",worker="w1@vm"} 1"#
            )
        );
    }

    #[test]
    fn celery_exporter_series_once_per_worker_and_queue() {
        let m = FlowerMetrics::new();
        let sent = serde_json::json!({"type": "task-sent", "hostname": "gen1@client", "name": "tasks.add",
            "queue": "realtime", "routing_key": "realtime"});
        let t = TaskRecord::default();
        m.observe(sent.as_object().unwrap(), &t, true);
        m.observe(sent.as_object().unwrap(), &t, false);
        m.exporter_worker("w1@vm", true);
        m.exporter_worker("w2@vm", false);
        m.queue("bulk", 7);
        let text = m.encode();
        assert!(
            text.contains(
                r#"celery_task_sent_total{name="tasks.add",hostname="gen1@client",queue_name="realtime"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"celery_worker_up{hostname="w1@vm"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"celery_worker_up{hostname="w2@vm"} 0"#),
            "{text}"
        );
        assert!(
            text.contains(r#"celery_queue_length{queue_name="bulk"} 7"#),
            "{text}"
        );
        assert!(
            text.contains(r#"celeriac_flower_queue_length{queue="bulk"} 7"#),
            "{text}"
        );
    }
}
