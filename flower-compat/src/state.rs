//! Cluster state built from Celery events, with the semantics of Celery's `celery.events.state` (what Flower
//! shows): workers from `worker-*` events (online, heartbeats, active, processed, load) and tasks from
//! `task-*` events, merged with Celery's precedence rules so out-of-order events do not move a task back.

use celeriac_protocol::event::EventKind;
use celeriac_protocol::result::State;
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, VecDeque};

/// Celery's `states.PRECEDENCE` index (lower = later in a task's life); unknown states sit with `None`.
fn precedence(state: &str) -> usize {
    State::parse(state).precedence()
}

/// A task as Flower shows it (`/api/task/info`): the stored record of `celeriac_flower_task`, one type from
/// the events to the table.
pub use celeriac_entities::flower_task::Model as TaskRecord;

fn opt_str(v: Option<&Value>) -> Option<String> {
    match v {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => Some(other.to_string()),
    }
}

/// A task record assembled from Celery events, as Celery's `events.state.Task` is.
pub trait TaskEvents {
    /// A task first seen now.
    fn new(uuid: &str) -> Self;

    /// Applies one `task-*` event (Celery's `Task.event`).
    fn apply(&mut self, event: &Map<String, Value>);

    /// Flower's JSON for one task (`/api/task/info`).
    fn to_json(&self) -> Value;
}

impl TaskEvents for TaskRecord {
    fn new(uuid: &str) -> Self {
        Self {
            uuid: uuid.to_string(),
            state: "PENDING".into(),
            ..Self::default()
        }
    }

    /// Sets the timestamp of the event's kind, then either moves the state forward with all the event's
    /// fields, or, when the event logically happened before the current state, keeps only the fields Celery's
    /// merge rules take from it.
    fn apply(&mut self, event: &Map<String, Value>) {
        let kind = event
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let known = EventKind::parse(kind);
        let timestamp = event.get("timestamp").and_then(Value::as_f64);
        // A custom `task-<name>` event sets the state `<NAME>`, as Celery's event state does.
        let state = match known.and_then(EventKind::task_state) {
            Some(s) => s.as_str().to_string(),
            None => kind
                .strip_prefix("task-")
                .unwrap_or_default()
                .to_uppercase(),
        };
        match known {
            Some(EventKind::TaskSent) => self.sent = timestamp,
            Some(EventKind::TaskReceived) => self.received = timestamp,
            Some(EventKind::TaskStarted) => self.started = timestamp,
            Some(EventKind::TaskFailed) => self.failed = timestamp,
            Some(EventKind::TaskRetried) => self.retried = timestamp,
            Some(EventKind::TaskSucceeded) => self.succeeded = timestamp,
            Some(EventKind::TaskRevoked) => self.revoked = timestamp,
            Some(EventKind::TaskRejected) => self.rejected = timestamp,
            _ => {}
        }
        let happened_before = state != "RETRY"
            && self.state != "RETRY"
            && precedence(&state) > precedence(&self.state);
        // Celery's merge rules: a late RECEIVED contributes only these fields; other late events contribute
        // all their fields but do not change the state or its timestamp.
        let keep: Option<&[&str]> = (happened_before && state == "RECEIVED").then_some(&[
            "name",
            "args",
            "kwargs",
            "parent_id",
            "root_id",
            "retries",
            "eta",
            "expires",
        ]);
        let take = |k: &str| keep.is_none_or(|keep| keep.contains(&k));
        for (k, v) in event {
            if !take(k) {
                continue;
            }
            match k.as_str() {
                "name" => self.name = opt_str(Some(v)),
                "args" => self.args = opt_str(Some(v)),
                "kwargs" => self.kwargs = opt_str(Some(v)),
                "eta" => self.eta = opt_str(Some(v)),
                "expires" => self.expires = opt_str(Some(v)),
                "retries" => self.retries = v.as_i64(),
                "result" => self.result = opt_str(Some(v)),
                "exception" => self.exception = opt_str(Some(v)),
                "runtime" => self.runtime = v.as_f64(),
                "traceback" => self.traceback = opt_str(Some(v)),
                "exchange" => self.exchange = opt_str(Some(v)),
                "routing_key" => self.routing_key = opt_str(Some(v)),
                "root_id" => self.root_id = opt_str(Some(v)),
                "parent_id" => self.parent_id = opt_str(Some(v)),
                "clock" => self.clock = v.as_i64().unwrap_or(self.clock),
                // A late event's timestamp is merged too (Celery updates the task's dict with all fields).
                "timestamp" => self.timestamp = v.as_f64(),
                _ => {}
            }
        }
        if !happened_before {
            self.state = state;
            self.timestamp = timestamp;
        }
        let hostname = opt_str(event.get("hostname"));
        if known == Some(EventKind::TaskSent) {
            self.client = hostname;
        } else if hostname.is_some() {
            self.worker = hostname;
        }
    }

    fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("uuid".into(), json!(self.uuid));
        m.insert("name".into(), json!(self.name));
        m.insert("state".into(), json!(self.state));
        m.insert("received".into(), json!(self.received));
        m.insert("sent".into(), json!(self.sent));
        m.insert("started".into(), json!(self.started));
        m.insert("rejected".into(), json!(self.rejected));
        m.insert("succeeded".into(), json!(self.succeeded));
        m.insert("failed".into(), json!(self.failed));
        m.insert("retried".into(), json!(self.retried));
        m.insert("revoked".into(), json!(self.revoked));
        m.insert("args".into(), json!(self.args));
        m.insert("kwargs".into(), json!(self.kwargs));
        m.insert("eta".into(), json!(self.eta));
        m.insert("expires".into(), json!(self.expires));
        m.insert("retries".into(), json!(self.retries));
        m.insert("worker".into(), json!(self.worker));
        m.insert("result".into(), json!(self.result));
        m.insert("exception".into(), json!(self.exception));
        m.insert("timestamp".into(), json!(self.timestamp));
        m.insert("runtime".into(), json!(self.runtime));
        m.insert("traceback".into(), json!(self.traceback));
        m.insert("exchange".into(), json!(self.exchange));
        m.insert("routing_key".into(), json!(self.routing_key));
        m.insert("clock".into(), json!(self.clock));
        m.insert("client".into(), json!(self.client));
        m.insert("root".into(), json!(self.root_id));
        m.insert("root_id".into(), json!(self.root_id));
        m.insert("parent".into(), json!(self.parent_id));
        m.insert("parent_id".into(), json!(self.parent_id));
        m.insert("children".into(), json!(self.children.0));
        Value::Object(m)
    }
}

/// A worker as Flower's dashboard shows it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct WorkerRecord {
    /// Node name.
    pub hostname: String,
    /// Process id.
    pub pid: Option<i64>,
    /// Heartbeat frequency in seconds.
    pub freq: f64,
    /// Local receive times of the last heartbeats (at most 4, as Celery keeps).
    pub heartbeats: VecDeque<f64>,
    /// Logical clock.
    pub clock: i64,
    /// Tasks running now.
    pub active: i64,
    /// Tasks processed.
    pub processed: i64,
    /// Load average.
    pub loadavg: Vec<f64>,
    /// Software (`py-celery`, `celeriac`).
    pub sw_ident: Option<String>,
    /// Software version.
    pub sw_ver: Option<String>,
    /// Operating system.
    pub sw_sys: Option<String>,
    /// Event counts by type.
    pub events: BTreeMap<String, u64>,
    /// False after `worker-offline`.
    pub offline: bool,
}

impl WorkerRecord {
    /// Online when its last heartbeat is younger than `freq × 2` (Celery's `Worker.alive`, with a floor).
    pub fn alive(&self, now: f64) -> bool {
        !self.offline
            && self
                .heartbeats
                .back()
                .is_some_and(|last| now < last + self.freq.max(1.0) * 2.0 + 1.0)
    }

    /// Flower's `/workers?json=1` entry.
    pub fn to_json(&self, now: f64) -> Value {
        let mut m = Map::new();
        for (k, v) in &self.events {
            m.insert(k.clone(), json!(v));
        }
        m.insert("hostname".into(), json!(self.hostname));
        m.insert("pid".into(), json!(self.pid));
        m.insert("freq".into(), json!(self.freq));
        m.insert("heartbeats".into(), json!(self.heartbeats));
        m.insert("clock".into(), json!(self.clock));
        m.insert("active".into(), json!(self.active));
        m.insert("processed".into(), json!(self.processed));
        m.insert("loadavg".into(), json!(self.loadavg));
        m.insert("sw_ident".into(), json!(self.sw_ident));
        m.insert("sw_ver".into(), json!(self.sw_ver));
        m.insert("sw_sys".into(), json!(self.sw_sys));
        m.insert("status".into(), json!(self.alive(now)));
        Value::Object(m)
    }
}

/// Live cluster state: every worker, and the tasks whose events changed since the last flush.
#[derive(Debug, Default)]
pub struct ClusterState {
    /// Workers by node name.
    pub workers: BTreeMap<String, WorkerRecord>,
    /// Total events seen.
    pub event_count: u64,
}

impl ClusterState {
    /// Applies a worker event. `received` is the local receive time.
    pub fn worker_event(&mut self, event: &Map<String, Value>, received: f64) {
        self.event_count += 1;
        let Some(host) = event.get("hostname").and_then(Value::as_str) else {
            return;
        };
        let kind = event
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let w = self
            .workers
            .entry(host.to_string())
            .or_insert_with(|| WorkerRecord {
                hostname: host.to_string(),
                freq: 2.0,
                ..WorkerRecord::default()
            });
        *w.events.entry(kind.to_string()).or_default() += 1;
        if let Some(v) = event.get("pid").and_then(Value::as_i64) {
            w.pid = Some(v);
        }
        if let Some(v) = event.get("freq").and_then(Value::as_f64) {
            w.freq = v;
        }
        if let Some(v) = event.get("clock").and_then(Value::as_i64) {
            w.clock = v;
        }
        if let Some(v) = event.get("active").and_then(Value::as_i64) {
            w.active = v;
        }
        if let Some(v) = event.get("processed").and_then(Value::as_i64) {
            w.processed = v;
        }
        if let Some(Value::Array(l)) = event.get("loadavg") {
            w.loadavg = l.iter().filter_map(Value::as_f64).collect();
        }
        for (k, slot) in [
            ("sw_ident", &mut w.sw_ident),
            ("sw_ver", &mut w.sw_ver),
            ("sw_sys", &mut w.sw_sys),
        ] {
            if let Some(v) = event.get(k).and_then(Value::as_str) {
                *slot = Some(v.to_string());
            }
        }
        if EventKind::parse(kind) == Some(EventKind::WorkerOffline) {
            w.offline = true;
            w.heartbeats.clear();
        } else {
            w.offline = false;
            w.heartbeats.push_back(received);
            while w.heartbeats.len() > 4 {
                w.heartbeats.pop_front();
            }
        }
    }

    /// Counts a task event against its worker (Flower's per-worker event counters).
    pub fn task_event_seen(&mut self, event: &Map<String, Value>) {
        self.event_count += 1;
        let kind = event
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if EventKind::parse(kind) == Some(EventKind::TaskSent) {
            return;
        }
        if let Some(host) = event.get("hostname").and_then(Value::as_str) {
            let w = self
                .workers
                .entry(host.to_string())
                .or_insert_with(|| WorkerRecord {
                    hostname: host.to_string(),
                    freq: 2.0,
                    ..WorkerRecord::default()
                });
            *w.events.entry(kind.to_string()).or_default() += 1;
        }
    }
}

/// Splits an event message body into events: a single event object, or a list (`task.multi`).
pub fn events_in(body: Value) -> Vec<Map<String, Value>> {
    match body {
        Value::Object(m) => vec![m],
        Value::Array(items) => items
            .into_iter()
            .filter_map(|v| match v {
                Value::Object(m) => Some(m),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn a_task_through_its_life_as_flower_shows_it() {
        let mut t = TaskRecord::new("t1");
        t.apply(&ev(json!({"type": "task-sent", "hostname": "gen1@vm", "uuid": "t1", "name": "tasks.add",
            "args": "(2, 3)", "kwargs": "{}", "retries": 0, "eta": null, "expires": null, "exchange": "",
            "routing_key": "celery", "root_id": "t1", "parent_id": null, "timestamp": 10.0, "clock": 1})));
        assert_eq!(t.state, "PENDING");
        assert_eq!(t.client.as_deref(), Some("gen1@vm"));
        t.apply(&ev(
            json!({"type": "task-received", "hostname": "w1@vm", "uuid": "t1", "name": "tasks.add",
            "args": "(2, 3)", "kwargs": "{}", "retries": 0, "timestamp": 11.0, "clock": 5}),
        ));
        t.apply(&ev(json!({"type": "task-started", "hostname": "w1@vm", "uuid": "t1", "timestamp": 12.0, "clock": 6})));
        t.apply(&ev(
            json!({"type": "task-succeeded", "hostname": "w1@vm", "uuid": "t1", "result": "5",
            "runtime": 0.5, "timestamp": 12.5, "clock": 7}),
        ));
        assert_eq!(t.state, "SUCCESS");
        assert_eq!(t.result.as_deref(), Some("5"));
        assert_eq!(
            (t.sent, t.received, t.started, t.succeeded),
            (Some(10.0), Some(11.0), Some(12.0), Some(12.5))
        );
        assert_eq!(t.timestamp, Some(12.5));
        assert_eq!(t.worker.as_deref(), Some("w1@vm"));
        assert_eq!(t.routing_key.as_deref(), Some("celery"));
        let j = t.to_json();
        assert_eq!(j["root"], "t1");
        assert_eq!(j["children"], json!([]));
    }

    #[test]
    fn out_of_order_events_do_not_move_a_task_back() {
        let mut t = TaskRecord::new("t2");
        t.apply(&ev(json!({"type": "task-succeeded", "hostname": "w1@vm", "result": "1", "timestamp": 5.0, "clock": 9})));
        // The received event arrives late: its name/args are merged, the state stays SUCCESS.
        t.apply(&ev(
            json!({"type": "task-received", "hostname": "w1@vm", "name": "tasks.x", "args": "(1,)",
            "timestamp": 4.0, "clock": 7}),
        ));
        t.apply(&ev(
            json!({"type": "task-started", "hostname": "w1@vm", "timestamp": 4.5, "clock": 8}),
        ));
        assert_eq!(t.state, "SUCCESS");
        assert_eq!(t.name.as_deref(), Some("tasks.x"));
        assert_eq!(t.args.as_deref(), Some("(1,)"));
        assert_eq!(
            t.timestamp,
            Some(4.5),
            "the late STARTED's timestamp is merged, as Celery does"
        );
        assert_eq!(t.received, Some(4.0));
        assert_eq!(
            t.clock, 8,
            "a late STARTED merges its fields (Celery has no merge rule for it)"
        );
    }

    #[test]
    fn retry_then_success() {
        let mut t = TaskRecord::new("t3");
        t.apply(&ev(json!({"type": "task-retried", "hostname": "w1@vm", "exception": "KeyError('x')", "timestamp": 1.0})));
        assert_eq!(t.state, "RETRY");
        t.apply(&ev(
            json!({"type": "task-received", "hostname": "w1@vm", "retries": 1, "timestamp": 2.0}),
        ));
        assert_eq!(t.state, "RECEIVED");
        assert_eq!(t.retries, Some(1));
    }

    #[test]
    fn workers_come_and_go() {
        let mut s = ClusterState::default();
        s.worker_event(
            &ev(
                json!({"type": "worker-online", "hostname": "w1@vm", "freq": 2.0, "active": 0,
            "processed": 0, "loadavg": [0.5, 0.4, 0.3], "sw_ident": "celeriac", "pid": 7}),
            ),
            100.0,
        );
        s.worker_event(
            &ev(
                json!({"type": "worker-heartbeat", "hostname": "w1@vm", "freq": 2.0, "active": 1,
            "processed": 3}),
            ),
            102.0,
        );
        let w = &s.workers["w1@vm"];
        assert!(w.alive(104.0));
        assert!(!w.alive(110.0));
        assert_eq!((w.active, w.processed, w.pid), (1, 3, Some(7)));
        assert_eq!(w.events["worker-heartbeat"], 1);
        s.worker_event(
            &ev(json!({"type": "worker-offline", "hostname": "w1@vm"})),
            105.0,
        );
        assert!(!s.workers["w1@vm"].alive(105.0));
        assert_eq!(s.workers["w1@vm"].to_json(105.0)["status"], false);
    }

    #[test]
    fn multi_bodies_split_into_events() {
        assert_eq!(events_in(json!([{"type": "a"}, {"type": "b"}, 3])).len(), 2);
        assert_eq!(events_in(json!({"type": "a"})).len(), 1);
    }
}
