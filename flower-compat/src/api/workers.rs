//! Workers in Flower's API: `/api/workers` (with a fresh inspect on request), remote control of tasks
//! (revoke, rate limit, time limits) and workers (shutdown, pool and consumer commands), `/api/queues/length`.

use super::tasks::unknown_task;
use super::*;

fn known_worker(app: &App, node: &str) -> bool {
    app.inspected.lock().expect("inspected").contains_key(node)
        || app
            .cluster
            .lock()
            .expect("cluster")
            .workers
            .contains_key(node)
}

pub(super) async fn workers(State(app): Shared, Query(p): Params) -> Response {
    let workername = p.get("workername").cloned();
    if let Some(w) = &workername
        && !known_worker(&app, w)
    {
        return error(StatusCode::NOT_FOUND, format!("Unknown worker '{w}'"));
    }
    if flag(&p, "status") {
        let t = now();
        let cluster = app.cluster.lock().expect("cluster");
        let inspected = app.inspected.lock().expect("inspected");
        let mut out = Map::new();
        let names = cluster.workers.keys().chain(inspected.keys());
        for name in names {
            if workername.as_ref().is_some_and(|w| w != name) || out.contains_key(name) {
                continue;
            }
            let alive = cluster.workers.get(name).is_some_and(|w| w.alive(t));
            out.insert(name.clone(), json!(alive));
        }
        return ok(Value::Object(out));
    }
    if flag(&p, "refresh")
        && let Err(e) = app.refresh_workers(workername.as_deref()).await
    {
        return internal(e);
    }
    let inspected = app.inspected.lock().expect("inspected");
    let out: Map<String, Value> = inspected
        .iter()
        .filter(|(k, _)| workername.as_ref().is_none_or(|w| w == *k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    ok(Value::Object(out))
}

/// Query parameters and form fields together (Flower's `get_argument`).
fn arguments(p: &HashMap<String, String>, body: &Bytes) -> HashMap<String, String> {
    let mut out = p.clone();
    for (k, v) in url::form_urlencoded::parse(body) {
        out.entry(k.into_owned()).or_insert_with(|| v.into_owned());
    }
    out
}

async fn broadcast(
    app: &App,
    method: &str,
    args: Value,
    node: Option<&str>,
) -> Result<Map<String, Value>, Response> {
    let destination = node.map(|n| vec![n.to_string()]);
    celeriac_broker::pidbox::call(
        app.broker.as_ref(),
        method,
        args,
        destination.as_deref(),
        app.settings.inspect_timeout,
    )
    .await
    .map_err(internal)
}

fn reply_ok<'a>(replies: &'a Map<String, Value>, node: &str) -> Option<&'a str> {
    replies
        .get(node)
        .and_then(|r| r.get("ok"))
        .and_then(Value::as_str)
}

fn reason(replies: &Map<String, Value>, node: &str) -> String {
    replies
        .get(node)
        .and_then(|r| r.get("error"))
        .and_then(Value::as_str)
        .unwrap_or("Unknown reason")
        .to_string()
}

pub(super) async fn revoke(
    State(app): Shared,
    Path(id): Path<String>,
    Query(p): Params,
    body: Bytes,
) -> Response {
    let a = arguments(&p, &body);
    let terminate = flag(&a, "terminate");
    let signal = a.get("signal").cloned().unwrap_or_else(|| "SIGTERM".into());
    let args = json!({"task_id": [id], "terminate": terminate, "signal": signal});
    // Celery's control.revoke does not wait for replies.
    if let Err(e) = celeriac_broker::pidbox::call(
        app.broker.as_ref(),
        "revoke",
        args,
        None,
        Duration::from_millis(50),
    )
    .await
    {
        return internal(e);
    }
    ok(json!({"message": format!("Revoked '{id}'")}))
}

pub(super) async fn rate_limit(
    State(app): Shared,
    Path(name): Path<String>,
    Query(p): Params,
    body: Bytes,
) -> Response {
    let a = arguments(&p, &body);
    let args = json!({"task_name": name, "rate_limit": a.get("ratelimit")});
    task_command(
        &app,
        &name,
        &a,
        "rate_limit",
        args,
        "Failed to set rate limit",
    )
    .await
}

pub(super) async fn timeout(
    State(app): Shared,
    Path(name): Path<String>,
    Query(p): Params,
    body: Bytes,
) -> Response {
    let a = arguments(&p, &body);
    let num = |k: &str| a.get(k).and_then(|v| v.parse::<f64>().ok());
    let args = json!({"task_name": name, "hard": num("hard"), "soft": num("soft")});
    task_command(
        &app,
        &name,
        &a,
        "time_limit",
        args,
        "Failed to set timeouts",
    )
    .await
}

/// A per-task command for the worker named by `workername` (Flower's rate-limit and timeout): the task must be
/// known first, then the worker; the worker's own message on success.
async fn task_command(
    app: &App,
    task: &str,
    a: &HashMap<String, String>,
    method: &str,
    args: Value,
    failure: &str,
) -> Response {
    if let Some(r) = unknown_task(app, task).await {
        return r;
    }
    let Some(node) = a.get("workername") else {
        return error(
            StatusCode::BAD_REQUEST,
            "Missing argument workername".into(),
        );
    };
    worker_command(app, node, method, args, str::to_string, |r| {
        format!("{failure}: '{r}'")
    })
    .await
}

pub(super) async fn shutdown(State(app): Shared, Path(node): Path<String>) -> Response {
    if !known_worker(&app, &node) {
        return error(StatusCode::NOT_FOUND, format!("Unknown worker '{node}'"));
    }
    let destination = vec![node.clone()];
    if let Err(e) = celeriac_broker::pidbox::call(
        app.broker.as_ref(),
        "shutdown",
        json!({}),
        Some(&destination),
        Duration::from_millis(50),
    )
    .await
    {
        return internal(e);
    }
    ok(json!({"message": "Shutting down!"}))
}

/// A pool or queue command sent to one worker: Flower's message on success, 403 with the reason otherwise.
async fn worker_command(
    app: &App,
    node: &str,
    method: &str,
    args: Value,
    success: impl FnOnce(&str) -> String,
    failure: impl FnOnce(String) -> String,
) -> Response {
    if !known_worker(app, node) {
        return error(StatusCode::NOT_FOUND, format!("Unknown worker '{node}'"));
    }
    match broadcast(app, method, args, Some(node)).await {
        Ok(r) => match reply_ok(&r, node) {
            Some(m) => ok(json!({"message": success(m)})),
            None => failed(failure(reason(&r, node))),
        },
        Err(r) => r,
    }
}

fn n_arg(p: &HashMap<String, String>) -> u64 {
    p.get("n").and_then(|v| v.parse().ok()).unwrap_or(1)
}

pub(super) async fn pool_action(
    State(app): Shared,
    Path((action, node)): Path<(String, String)>,
    Query(p): Params,
    body: Bytes,
) -> Response {
    worker_action(&app, "pool", &action, &node, &arguments(&p, &body)).await
}

pub(super) async fn queue_action(
    State(app): Shared,
    Path((action, node)): Path<(String, String)>,
    Query(p): Params,
    body: Bytes,
) -> Response {
    worker_action(&app, "queue", &action, &node, &arguments(&p, &body)).await
}

/// `/api/worker/pool/{grow,shrink,autoscale,restart}/<node>` and
/// `/api/worker/queue/{add-consumer,cancel-consumer}/<node>`: the command, its arguments, Flower's message on
/// success (`None`: the worker's own) and the start of its failure message.
async fn worker_action(
    app: &App,
    group: &str,
    action: &str,
    node: &str,
    a: &HashMap<String, String>,
) -> Response {
    let n = n_arg(a);
    let queue = a.get("queue").cloned().unwrap_or_default();
    let num = |k: &str| a.get(k).and_then(|v| v.parse::<u64>().ok());
    let text = |k: &str| a.get(k).cloned().unwrap_or_default();
    let (method, args, success, failure) = match (group, action) {
        ("pool", "grow") => (
            "pool_grow",
            json!({"n": n}),
            Some(format!("Growing '{node}' worker's pool by {n}")),
            format!("Failed to grow '{node}' worker's pool"),
        ),
        ("pool", "shrink") => (
            "pool_shrink",
            json!({"n": n}),
            Some(format!("Shrinking '{node}' worker's pool by {n}")),
            format!("Failed to shrink '{node}' worker's pool"),
        ),
        ("pool", "autoscale") => (
            "autoscale",
            json!({"max": num("max"), "min": num("min")}),
            Some(format!(
                "Autoscaling '{node}' worker (min={}, max={})",
                text("min"),
                text("max")
            )),
            format!("Failed to autoscale '{node}' worker"),
        ),
        ("pool", "restart") => (
            "pool_restart",
            json!({"reload": false}),
            Some(format!("Restarting '{node}' worker's pool")),
            format!("Failed to restart the '{node}' pool"),
        ),
        ("queue", "add-consumer") => (
            "add_consumer",
            json!({"queue": queue, "exchange": null, "exchange_type": "direct", "routing_key": null}),
            None,
            format!("Failed to add '{queue}' consumer to '{node}' worker"),
        ),
        ("queue", "cancel-consumer") => (
            "cancel_consumer",
            json!({"queue": queue}),
            None,
            format!("Failed to cancel '{queue}' consumer from '{node}' worker"),
        ),
        _ => return error(StatusCode::NOT_FOUND, "Not Found".into()),
    };
    worker_command(
        app,
        node,
        method,
        args,
        |reply| success.unwrap_or_else(|| reply.to_string()),
        |reason| format!("{failure}: {reason}"),
    )
    .await
}

pub(super) async fn queues_length(State(app): Shared) -> Response {
    let mut names: Vec<String> = Vec::new();
    {
        let inspected = app.inspected.lock().expect("inspected");
        for info in inspected.values() {
            if let Some(Value::Array(qs)) = info.get("active_queues") {
                for q in qs
                    .iter()
                    .filter_map(|q| q.get("name").and_then(Value::as_str))
                {
                    if !names.iter().any(|n| n == q) {
                        names.push(q.to_string());
                    }
                }
            }
        }
    }
    if names.is_empty() {
        names = app.settings.default_queues.clone();
    }
    names.sort();
    names.dedup();
    let mut out = Vec::new();
    for q in names {
        match app.broker.queue_length(&q).await {
            Ok(n) => out.push(json!({"name": q, "messages": n})),
            Err(e) => return internal(e),
        }
    }
    ok(json!({"active_queues": out}))
}
