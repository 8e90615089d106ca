//! Remote control (kombu pidbox): answers `celery inspect` / `celery control` requests broadcast to every
//! worker, with Celery's reply shapes.

use super::*;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use celeriac_protocol::pidbox::ControlCommand;
use futures::StreamExt;

/// What `inspect active` shows of a running task.
pub(super) struct Running {
    pub info: RequestInfo,
    pub terminate: CancellationToken,
}

/// A received task not started yet.
pub(super) struct Waiting {
    pub info: RequestInfo,
    /// Set while it waits for its ETA (`inspect scheduled`).
    pub eta: Option<String>,
}

/// Celery's `Request.info()`, what `inspect active/reserved/scheduled/query_task` show of a task: kept as
/// fields for every task received and rendered as JSON only when asked.
pub(super) struct RequestInfo {
    id: String,
    name: String,
    args: Vec<Value>,
    kwargs: Map<String, Value>,
    routing_key: String,
    priority: u8,
    redelivered: bool,
    time_start: Option<f64>,
    acknowledged: bool,
    pid: Option<u32>,
}

impl RequestInfo {
    pub(super) fn of(
        job: &Job,
        time_start: Option<f64>,
        acknowledged: bool,
        pid: Option<u32>,
    ) -> Self {
        let h = &job.message.headers;
        Self {
            id: h.id.clone(),
            name: h.task.clone(),
            args: job.message.args.clone(),
            kwargs: job.message.kwargs.clone(),
            routing_key: job.held.routing_key.clone(),
            priority: job.message.properties.priority,
            redelivered: job.held.redelivered,
            time_start,
            acknowledged,
            pid,
        }
    }

    pub(super) fn to_json(&self, hostname: &str) -> Value {
        json!({"id": self.id, "name": self.name, "args": self.args, "kwargs": self.kwargs,
            "type": self.name, "hostname": hostname, "time_start": self.time_start,
            "acknowledged": self.acknowledged,
            "delivery_info": {"exchange": "", "routing_key": self.routing_key,
                "priority": self.priority, "redelivered": self.redelivered},
            "worker_pid": self.pid})
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

pub(super) fn running_from(job: &Job, terminate: CancellationToken) -> Running {
    Running {
        info: RequestInfo::of(job, Some(unix_now()), true, Some(crate::pid())),
        terminate,
    }
}

/// Python's `bool(value)` for JSON values.
pub(super) fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

fn reply_for(
    shared: &Shared,
    method: ControlCommand,
    args: &Value,
    clock: u64,
    started: Instant,
) -> Option<Value> {
    let s = &shared.settings;
    Some(match method {
        ControlCommand::Ping => json!({"ok": "pong"}),
        ControlCommand::Clock => json!({"clock": clock}),
        ControlCommand::Registered => {
            let names: Vec<String> = shared.registry.names().into_iter().filter(|n| !n.starts_with("celery.")).collect();
            json!(names)
        }
        ControlCommand::ActiveQueues => Value::Array(
            shared
                .current_queues()
                .iter()
                .map(|q| {
                    json!({"name": q, "exchange": {"name": q, "type": "direct", "arguments": null, "durable": true,
                    "passive": false, "auto_delete": false, "delivery_mode": null, "no_declare": false},
                    "routing_key": q, "queue_arguments": null, "binding_arguments": null, "consumer_arguments": null,
                    "durable": true, "exclusive": false, "auto_delete": false, "no_ack": false, "alias": null,
                    "bindings": [], "no_declare": null, "expires": null, "message_ttl": null, "max_length": null,
                    "max_length_bytes": null, "max_priority": null})
                })
                .collect(),
        ),
        ControlCommand::Active => {
            let running = shared.running.lock().expect("running");
            Value::Array(running.values().map(|r| r.info.to_json(&s.hostname)).collect())
        }
        ControlCommand::Reserved => {
            let waiting = shared.waiting.lock().expect("waiting");
            Value::Array(
                waiting
                    .values()
                    .filter(|w| w.eta.is_none())
                    .map(|w| w.info.to_json(&s.hostname))
                    .collect(),
            )
        }
        ControlCommand::Scheduled => {
            let waiting = shared.waiting.lock().expect("waiting");
            // Celery's timer entries for ETA tasks have priority 6.
            Value::Array(
                waiting
                    .values()
                    .filter_map(|w| {
                        w.eta.as_ref().map(|eta| {
                            json!({"eta": eta, "priority": 6, "request": w.info.to_json(&s.hostname)})
                        })
                    })
                    .collect(),
            )
        }
        ControlCommand::Revoked => {
            let mut ids: Vec<String> = shared.revoked.read().expect("revoked").iter().cloned().collect();
            ids.sort();
            json!(ids)
        }
        ControlCommand::Conf => {
            // Celery answers with the settings it was configured with (`with_defaults=False`).
            let routes: Map<String, Value> = s
                .routes
                .iter()
                .map(|(task, queue)| (task.clone(), json!({"queue": queue})))
                .collect();
            json!({
                "task_default_queue": s.default_queue,
                "task_routes": routes,
                "worker_concurrency": s.concurrency,
                "worker_prefetch_multiplier": s.prefetch_multiplier,
                "task_acks_late": s.acks_late,
                "task_reject_on_worker_lost": s.reject_on_worker_lost,
                "task_ignore_result": s.ignore_result,
                "result_extended": s.result_extended,
                "task_track_started": s.track_started,
                "task_acks_on_failure_or_timeout": s.acks_on_failure_or_timeout,
                "task_time_limit": s.time_limit,
                "task_soft_time_limit": s.soft_time_limit,
                "worker_send_task_events": shared.events.task_events(),
                "broker_transport_options": {"visibility_timeout": s.visibility_timeout.as_secs_f64()},
                "include": [],
            })
        }
        ControlCommand::QueryTask => {
            let ids: Vec<&str> = match args.get("ids") {
                Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
                Some(Value::String(one)) => vec![one.as_str()],
                _ => Vec::new(),
            };
            let running = shared.running.lock().expect("running");
            let waiting = shared.waiting.lock().expect("waiting");
            let mut out = Map::new();
            for id in ids {
                if let Some(r) = running.get(id) {
                    out.insert(id.to_string(), json!(["active", r.info.to_json(&s.hostname)]));
                } else if let Some(w) = waiting.get(id) {
                    let state = if w.eta.is_some() { "scheduled" } else { "reserved" };
                    out.insert(id.to_string(), json!([state, w.info.to_json(&s.hostname)]));
                }
            }
            Value::Object(out)
        }
        ControlCommand::Stats => json!({
            "total": shared.metrics.totals(),
            "pid": crate::pid(),
            "clock": clock.to_string(),
            "uptime": started.elapsed().as_secs(),
            "pool": {"implementation": "celeriac:tokio",
                "max-concurrency": shared.concurrency_now.load(std::sync::atomic::Ordering::Relaxed),
                "processes": [crate::pid()], "max-tasks-per-child": "N/A",
                "put-guarded-by-semaphore": false, "timeouts": [0, 0], "writes": {}},
            "broker": {"transport": shared.broker.transport()},
            "prefetch_count": s.prefetch(),
            "rusage": {},
        }),
        ControlCommand::EnableEvents => {
            let was = shared.events.set_task_events(true);
            json!({"ok": if was { "task events already enabled" } else { "task events enabled" }})
        }
        ControlCommand::DisableEvents => {
            shared.events.set_task_events(false);
            json!({"ok": "task events disabled"})
        }
        ControlCommand::Heartbeat => {
            shared.events.worker(EventKind::WorkerHeartbeat, 5.0);
            Value::Null
        }
        _ => {
            let _ = args;
            return None;
        }
    })
}

/// `revoke`: remembered by this worker, persisted for every worker and restart, REVOKED stored for tasks
/// not running here; with `terminate`, running ones are stopped.
async fn revoke(shared: &Shared, args: &Value, force_terminate: bool) -> Value {
    let ids: Vec<String> = match args.get("task_id") {
        Some(Value::String(id)) => vec![id.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    };
    // Python truthiness, as Celery's `if terminate:` (Flower sends `1`).
    let terminate = force_terminate || args.get("terminate").is_some_and(truthy);
    shared
        .revoked
        .write()
        .expect("revoked")
        .extend(ids.iter().cloned());
    // Celery keeps revokes 3 hours (REVOKE_EXPIRES); so do we, in the broker.
    if let Err(e) = shared
        .broker
        .add_revoked(&ids, Duration::from_secs(10_800))
        .await
    {
        warn!(error = %e, "persisting revoked ids failed");
    }
    let mut terminated = Vec::new();
    {
        let running = shared.running.lock().expect("running");
        for id in &ids {
            match running.get(id) {
                Some(r) if terminate => {
                    r.terminate.cancel();
                    terminated.push(id.clone());
                }
                Some(_) => {}
                None => {
                    let exc =
                        ExceptionInfo::new("celery.exceptions", "TaskRevokedError", "revoked");
                    let mut m = ResultMeta::new(id.clone(), State::Revoked, json!(exc));
                    m.children = None;
                    m.date_done = Some(time::isoformat(chrono::Utc::now()));
                    let _ = shared.commit.send(Commit::Done {
                        meta: Some(Box::new(m)),
                        ack: Ack::None,
                    });
                }
            }
        }
    }
    if terminate {
        let which = if terminated.is_empty() {
            "tasks unknown".to_string()
        } else {
            terminated.join(", ")
        };
        json!({"ok": format!("terminate: {which}")})
    } else {
        let set: Vec<String> = ids.iter().map(|i| format!("'{i}'")).collect();
        json!({"ok": format!("tasks {{{}}} flagged as revoked", set.join(", "))})
    }
}

/// Commands that change the running worker. `Some(None)`: handled, no reply (shutdown); `None`: not one
/// of these.
async fn control(
    shared: &Arc<Shared>,
    method: ControlCommand,
    args: &Value,
) -> Option<Option<Value>> {
    let text = |k: &str| args.get(k).and_then(Value::as_str).map(str::to_string);
    let ok = |m: String| Some(Some(json!({"ok": m})));
    match method {
        ControlCommand::RateLimit => {
            let task = text("task_name").unwrap_or_default();
            if shared.registry.get(&task).is_none() {
                return Some(Some(json!({"error": format!("unknown task {task:?}")})));
            }
            let limiter = match args.get("rate_limit") {
                None | Some(Value::Null) => None,
                Some(v) => {
                    let r = v
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| v.to_string());
                    if r == "0" {
                        None
                    } else {
                        match RateLimit::parse(&r, false) {
                            Ok(rate) => Some(Arc::new(Limiter::new(&task, rate))),
                            Err(e) => return Some(Some(json!({"error": e}))),
                        }
                    }
                }
            };
            let msg = if limiter.is_some() {
                "new rate limit set successfully"
            } else {
                "rate limit disabled successfully"
            };
            shared
                .dyn_limiters
                .write()
                .expect("limiters")
                .insert(task, limiter);
            ok(msg.into())
        }
        ControlCommand::TimeLimit => {
            let task = text("task_name").unwrap_or_default();
            if shared.registry.get(&task).is_none() {
                return Some(Some(json!({"error": format!("unknown task {task:?}")})));
            }
            let hard = args.get("hard").and_then(Value::as_f64);
            let soft = args.get("soft").and_then(Value::as_f64);
            shared
                .time_limits
                .write()
                .expect("time_limits")
                .insert(task, (hard, soft));
            ok("time limits set successfully".into())
        }
        ControlCommand::PoolGrow => {
            let n = args.get("n").and_then(Value::as_u64).unwrap_or(1) as usize;
            shared.concurrency.add_permits(n);
            shared
                .concurrency_now
                .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            ok("pool will grow".into())
        }
        ControlCommand::PoolShrink => {
            let n = args.get("n").and_then(Value::as_u64).unwrap_or(1) as usize;
            let now = shared
                .concurrency_now
                .load(std::sync::atomic::Ordering::Relaxed);
            let n = n.min(now.saturating_sub(1));
            shared
                .concurrency_now
                .fetch_sub(n, std::sync::atomic::Ordering::Relaxed);
            let sem = Arc::clone(&shared.concurrency);
            // Slots are taken back as running tasks finish.
            tokio::spawn(async move {
                if let Ok(p) = sem.acquire_many_owned(n as u32).await {
                    p.forget();
                }
            });
            ok("pool will shrink".into())
        }
        ControlCommand::AddConsumer => {
            let queue = text("queue").unwrap_or_default();
            if queue.is_empty() {
                return Some(Some(json!({"error": "no queue given"})));
            }
            if let Err(e) = shared.broker.declare(std::slice::from_ref(&queue)).await {
                return Some(Some(json!({"error": e.to_string()})));
            }
            let mut queues = shared.queues.write().expect("queues");
            if queues.contains(&queue) {
                return ok(format!("already consuming from {queue}"));
            }
            queues.push(queue.clone());
            ok(format!("add consumer {queue}"))
        }
        ControlCommand::CancelConsumer => {
            let queue = text("queue").unwrap_or_default();
            shared
                .queues
                .write()
                .expect("queues")
                .retain(|q| *q != queue);
            // A fetch that read the old list may be blocked on the queue: end it and wait until what it
            // popped is given back, so after the reply nothing of `queue` is taken (as in Celery).
            let mut done = shared.fetched.subscribe();
            if shared.in_fetch.load(std::sync::atomic::Ordering::SeqCst) {
                if let Err(e) = shared.broker.interrupt_fetch().await {
                    warn!(error = %e, "cancel_consumer: could not interrupt the fetch in flight");
                }
                let _ = tokio::time::timeout(Duration::from_secs(3), done.changed()).await;
            }
            ok(format!("no longer consuming from {queue}"))
        }
        ControlCommand::Shutdown => {
            warn!("remote control: shutdown requested");
            shared.warm.cancel();
            Some(None)
        }
        _ => None,
    }
}

/// Serves remote-control requests until `stop`.
pub(super) async fn serve(shared: Arc<Shared>, stop: CancellationToken) {
    let started = Instant::now();
    let mut stream = match shared.broker.control_requests().await {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "remote control unavailable");
            return;
        }
    };
    let clock = std::sync::atomic::AtomicU64::new(0);
    loop {
        let raw = tokio::select! {
            m = stream.next() => match m { Some(m) => m, None => break },
            _ = stop.cancelled() => break,
        };
        let Ok(env) = Envelope::parse(&raw) else {
            continue;
        };
        let Ok(body) = env.body_bytes() else { continue };
        let Ok(req) = serde_json::from_slice::<Value>(&body) else {
            continue;
        };
        let theirs = env
            .headers
            .get("clock")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let now = clock
            .fetch_max(theirs, std::sync::atomic::Ordering::Relaxed)
            .max(theirs)
            + 1;
        clock.store(now, std::sync::atomic::Ordering::Relaxed);
        if !celeriac_protocol::pidbox::selected(&req, &shared.settings.hostname) {
            continue;
        }
        let method = req
            .get("method")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let arguments = req.get("arguments").cloned().unwrap_or(Value::Null);
        debug!(%method, "remote control request");
        let Some(command) = ControlCommand::parse(&method) else {
            warn!(%method, "unknown remote control command");
            continue;
        };
        let value = match command {
            ControlCommand::Revoke | ControlCommand::Terminate => {
                Some(revoke(&shared, &arguments, command == ControlCommand::Terminate).await)
            }
            _ => match control(&shared, command, &arguments).await {
                Some(v) => v,
                None => reply_for(&shared, command, &arguments, now, started),
            },
        };
        // `shutdown` answers nothing.
        let Some(value) = value else {
            continue;
        };
        let (Some(ticket), Some(rk)) = (
            req.get("ticket").and_then(Value::as_str),
            req.pointer("/reply_to/routing_key").and_then(Value::as_str),
        ) else {
            continue;
        };
        let mut reply = Map::new();
        reply.insert(shared.settings.hostname.clone(), value);
        let envelope = json!({
            "body": STANDARD.encode(celeriac_protocol::json::to_vec(&reply)),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {"ticket": ticket, "clock": now},
            "properties": {"delivery_mode": 1,
                "delivery_info": {"exchange": "reply.celery.pidbox", "routing_key": rk},
                "priority": 0, "body_encoding": "base64", "delivery_tag": uuid::Uuid::new_v4().to_string()},
        });
        if let Err(e) = shared
            .broker
            .control_reply(rk, &celeriac_protocol::json::to_vec(&envelope))
            .await
        {
            warn!(error = %e, %method, "sending a remote control reply failed");
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn python_truthiness() {
        use serde_json::json;
        assert!(super::truthy(&json!(1)));
        assert!(super::truthy(&json!(true)));
        assert!(super::truthy(&json!("SIGTERM")));
        assert!(!super::truthy(&json!(0)));
        assert!(!super::truthy(&json!(null)));
        assert!(!super::truthy(&json!(false)));
        assert!(!super::truthy(&json!("")));
    }
}
