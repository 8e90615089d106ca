//! Flower 2.2's HTTP API on axum: the same paths, parameters, status codes, messages and JSON shapes
//! (`/api/workers`, `/api/tasks`, `/api/task/...`, `/api/worker/...`, `/api/queues/length`, `/metrics`,
//! `/healthcheck`). Authentication as Flower: with basic auth configured everything but `/healthcheck` and
//! `/metrics` needs it; without, the API answers 401 unless unauthenticated access was switched on. Read-only
//! mode answers 403 to every request that would change something.

// Handlers answer errors with a ready `Response`; boxing it buys nothing on this path.
#![allow(clippy::result_large_err)]

use crate::{App, now};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use celeriac_canvas::{ApplyOptions, sig, with_option};
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

type Shared = State<Arc<App>>;
type Params = Query<HashMap<String, String>>;

const JSON_TYPE: &str = "application/json; charset=UTF-8";
const TEXT_TYPE: &str = "text/plain; charset=UTF-8";
const HTML_TYPE: &str = "text/html; charset=UTF-8";

fn json_response(status: StatusCode, v: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, JSON_TYPE)],
        celeriac_protocol::json::to_vec(v),
    )
        .into_response()
}

fn ok(v: Value) -> Response {
    json_response(StatusCode::OK, &v)
}

/// Flower's `HTTPError(status, reason)`: the reason as text.
fn error(status: StatusCode, reason: String) -> Response {
    (status, [(header::CONTENT_TYPE, TEXT_TYPE)], reason).into_response()
}

/// Flower's control failure: 403 with the text, text/html.
fn failed(text: String) -> Response {
    (
        StatusCode::FORBIDDEN,
        [(header::CONTENT_TYPE, HTML_TYPE)],
        text,
    )
        .into_response()
}

fn internal(e: impl std::fmt::Display) -> Response {
    error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

/// The routes.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/healthcheck", get(healthcheck))
        .route("/metrics", get(metrics))
        .route("/api/workers", get(workers))
        .route("/api/tasks", get(tasks))
        .route("/api/task/types", get(task_types))
        .route("/api/task/info/{id}", get(task_info))
        .route("/api/task/result/{id}", get(task_result))
        .route("/api/task/async-apply/{name}", post(async_apply))
        .route("/api/task/send-task/{name}", post(send_task))
        .route("/api/task/apply/{name}", post(apply))
        .route("/api/task/revoke/{id}", post(revoke))
        .route("/api/task/rate-limit/{name}", post(rate_limit))
        .route("/api/task/timeout/{name}", post(timeout))
        .route("/api/worker/shutdown/{node}", post(shutdown))
        .route("/api/worker/pool/{action}/{node}", post(pool_action))
        .route("/api/worker/queue/{action}/{node}", post(queue_action))
        .route("/api/queues/length", get(queues_length))
        .route("/", get(page))
        .route("/workers", get(workers_page))
        .route("/tasks", get(page))
        .route("/tasks/datatable", get(tasks_datatable))
        .route("/task/{id}", get(page))
        .route("/queues", get(page))
        .route("/static/{file}", get(static_file))
        .layer(middleware::from_fn_with_state(Arc::clone(&app), guard))
        .with_state(app)
}

fn decode_basic(headers: &HeaderMap) -> Option<(String, String)> {
    use base64::Engine;
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(v.strip_prefix("Basic ")?)
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

/// Authentication and read-only mode, as Flower decides them.
async fn guard(State(app): Shared, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let open = path == "/healthcheck" || path == "/metrics";
    let api = path.starts_with("/api/");
    let s = &app.settings;
    if !open {
        if !s.basic_auth.is_empty() {
            let good = decode_basic(req.headers())
                .is_some_and(|(u, p)| s.basic_auth.iter().any(|(bu, bp)| *bu == u && *bp == p));
            if !good {
                if api {
                    // Flower's API answers a bare 401; only its pages ask the browser for credentials.
                    return (
                        StatusCode::UNAUTHORIZED,
                        [(header::CONTENT_TYPE, HTML_TYPE)],
                        "",
                    )
                        .into_response();
                }
                let mut r = (
                    StatusCode::UNAUTHORIZED,
                    [(header::CONTENT_TYPE, HTML_TYPE)],
                    "Access denied",
                )
                    .into_response();
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"flower\""),
                );
                return r;
            }
        } else if api && !s.unauthenticated_api {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::CONTENT_TYPE, TEXT_TYPE)],
                "FLOWER_UNAUTHENTICATED_API environment variable is required to enable API without authentication",
            )
                .into_response();
        }
    }
    if s.read_only && req.method() == Method::POST {
        return error(StatusCode::FORBIDDEN, "Read only mode is enabled".into());
    }
    next.run(req).await
}

async fn healthcheck() -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, HTML_TYPE)], "OK").into_response()
}

async fn metrics(State(app): Shared, headers: HeaderMap) -> Response {
    let t = now();
    let with_worker = app.settings.metrics_worker_label;
    let workers: Vec<(String, bool, i64)> = app
        .cluster
        .lock()
        .expect("cluster")
        .workers
        .values()
        .map(|w| (w.hostname.clone(), w.alive(t), w.active))
        .collect();
    for (name, alive, active) in &workers {
        let l = crate::metrics::FlowerMetrics::worker_labels(name);
        app.metrics.online.get_or_create(&l).set(i64::from(*alive));
        app.metrics.executing.get_or_create(&l).set(*active);
        app.metrics.exporter_worker(name, *alive);
    }
    let (queues, concurrency) = {
        let inspected = app.inspected.lock().expect("inspected");
        let mut queues: Vec<String> = Vec::new();
        let mut concurrency = Vec::new();
        for (node, info) in inspected.iter() {
            if let Some(Value::Array(qs)) = info.get("active_queues") {
                for q in qs
                    .iter()
                    .filter_map(|q| q.get("name").and_then(Value::as_str))
                {
                    if !queues.iter().any(|x| x == q) {
                        queues.push(q.to_string());
                    }
                }
            }
            if let Some(c) = info
                .pointer("/stats/pool/max-concurrency")
                .and_then(Value::as_i64)
            {
                concurrency.push((node.clone(), c));
            }
        }
        (queues, concurrency)
    };
    for (node, c) in concurrency {
        let l = if with_worker {
            crate::metrics::FlowerMetrics::worker_labels(&node)
        } else {
            Vec::new()
        };
        app.metrics.concurrency.get_or_create(&l).set(c);
    }
    for q in queues {
        if let Ok(n) = app.broker.queue_length(&q).await {
            app.metrics.queue(&q, n);
        }
    }
    // Flower serves text/plain; a scraper asking for OpenMetrics gets that type.
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    let kind = if openmetrics {
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    } else {
        "text/plain"
    };
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, kind)],
        app.metrics.encode(),
    )
        .into_response()
}

fn flag(p: &HashMap<String, String>, k: &str) -> bool {
    p.get(k)
        .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

fn known_worker(app: &App, node: &str) -> bool {
    app.inspected.lock().expect("inspected").contains_key(node)
        || app
            .cluster
            .lock()
            .expect("cluster")
            .workers
            .contains_key(node)
}

async fn workers(State(app): Shared, Query(p): Params) -> Response {
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

/// Flower's `received_start`/`received_end`: `%Y-%m-%d %H:%M` in this process's local time (`mktime`).
fn parse_minute(s: &str) -> Option<f64> {
    use chrono::TimeZone;
    let naive = chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M").ok()?;
    chrono::Local
        .from_local_datetime(&naive)
        .earliest()
        .map(|t| t.timestamp() as f64)
}

/// Flower's sortable task fields.
const SORT_KEYS: [&str; 4] = ["name", "received", "started", "state"];

/// A Flower list parameter: absent, empty or `All` means no filter.
fn filter(p: &HashMap<String, String>, key: &str) -> Option<String> {
    p.get(key).filter(|v| !v.is_empty() && *v != "All").cloned()
}

/// An optional integer argument; Flower answers 400 to a non-number.
fn int_arg(p: &HashMap<String, String>, key: &str) -> Result<Option<i64>, Response> {
    match p.get(key) {
        None => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| {
            error(
                StatusCode::BAD_REQUEST,
                format!("Invalid argument '{v}' of type 'int'"),
            )
        }),
    }
}

async fn tasks(State(app): Shared, Query(p): Params) -> Response {
    let (limit, offset) = match (int_arg(&p, "limit"), int_arg(&p, "offset")) {
        (Ok(l), Ok(o)) => (l, o.unwrap_or(0)),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    let sort_by = p.get("sort_by").filter(|s| !s.is_empty()).cloned();
    if let Some(s) = &sort_by
        && !SORT_KEYS.contains(&s.trim_start_matches('-'))
    {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "Invalid sort_by '{s}', expected one of {}",
                SORT_KEYS.join(", ")
            ),
        );
    }
    let mut range = [None, None];
    for (slot, key) in range.iter_mut().zip(["received_start", "received_end"]) {
        if let Some(v) = p.get(key).filter(|v| !v.is_empty()) {
            match parse_minute(v) {
                Some(t) => *slot = Some(t),
                None => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "Invalid received_start or received_end, expected format 'YYYY-MM-DD HH:MM'"
                            .into(),
                    );
                }
            }
        }
    }
    let search = match p.get("search").map(|s| crate::search::parse(s)) {
        None => None,
        Some(Ok(q)) => Some(q),
        Some(Err(e)) => {
            return json_response(StatusCode::BAD_REQUEST, &json!({"error": e.to_string()}));
        }
    };
    if let Err(e) = app.flush().await {
        return internal(e);
    }
    let q = crate::store::TaskQuery {
        // A negative limit selects nothing, as Python's slice does.
        limit: limit.map(|l| l.max(0) as u64),
        offset: offset.max(0) as u64,
        sort_by,
        workername: filter(&p, "workername"),
        taskname: filter(&p, "taskname"),
        state: filter(&p, "state"),
        received_start: range[0],
        received_end: range[1],
        search,
    };
    match app.store.list(&q).await {
        Ok(list) => {
            let mut out = Map::new();
            for t in list {
                // /api/tasks lists `worker` last, and only when the task has one (Flower pops and re-adds it).
                let mut j = t.to_json();
                if let Value::Object(m) = &mut j {
                    match m.shift_remove("worker") {
                        Some(Value::Null) | None => {}
                        Some(w) => {
                            m.insert("worker".into(), w);
                        }
                    }
                }
                out.insert(t.uuid.clone(), j);
            }
            ok(Value::Object(out))
        }
        Err(e) => internal(e),
    }
}

async fn task_types(State(app): Shared) -> Response {
    if let Err(e) = app.flush().await {
        return internal(e);
    }
    match app.store.types().await {
        Ok(t) => ok(json!({"task-types": t})),
        Err(e) => internal(e),
    }
}

async fn task_info(State(app): Shared, Path(id): Path<String>) -> Response {
    match app.task(&id).await {
        Ok(Some(t)) => ok(t.to_json()),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("Unknown task '{id}'")),
        Err(e) => internal(e),
    }
}

/// Flower's result answer from a stored meta: `{"task-id", "state"}`, plus `result` once ready (an exception
/// as its repr) and `traceback` for a failure.
fn result_answer(id: &str, meta: Option<&Value>) -> Value {
    let state = meta
        .and_then(|m| m.get("status"))
        .and_then(Value::as_str)
        .unwrap_or("PENDING");
    let mut out = Map::new();
    out.insert("task-id".into(), json!(id));
    out.insert("state".into(), json!(state));
    if let (true, Some(m)) = (matches!(state, "SUCCESS" | "FAILURE" | "REVOKED"), meta) {
        let result = m.get("result").cloned().unwrap_or(Value::Null);
        let shown = if result.get("exc_type").is_some() {
            json!(exception_repr(Some(&result)))
        } else {
            result
        };
        out.insert("result".into(), shown);
        if state == "FAILURE" {
            out.insert(
                "traceback".into(),
                m.get("traceback").cloned().unwrap_or(Value::Null),
            );
        }
    }
    Value::Object(out)
}

/// `ValueError('boom')` from a stored exception dict.
fn exception_repr(v: Option<&Value>) -> String {
    let Some(v) = v else { return String::new() };
    let kind = v
        .get("exc_type")
        .and_then(Value::as_str)
        .unwrap_or("Exception");
    let args: Vec<String> = match v.get("exc_message") {
        Some(Value::Array(a)) => a.iter().map(celeriac_protocol::repr::repr).collect(),
        Some(other) => vec![celeriac_protocol::repr::repr(other)],
        None => Vec::new(),
    };
    format!("{kind}({})", args.join(", "))
}

async fn task_result(State(app): Shared, Path(id): Path<String>, Query(p): Params) -> Response {
    let meta = match p.get("timeout").and_then(|t| t.parse::<f64>().ok()) {
        Some(t) => {
            app.backend
                .wait(&id, Duration::from_secs_f64(t.max(0.0)))
                .await
        }
        None => app.backend.get(&id).await,
    };
    match meta {
        Ok(m) => ok(result_answer(&id, m.as_ref())),
        Err(e) => internal(e),
    }
}

/// The JSON body of an apply request (`args`, `kwargs`, and `apply_async` options).
fn apply_body(body: &Bytes) -> Result<Map<String, Value>, Response> {
    if body.is_empty() {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(error(StatusCode::BAD_REQUEST, "Invalid JSON body".into())),
    }
}

/// Flower's 404 for a task no worker registered (asked again once before answering).
async fn unknown_task(app: &App, name: &str) -> Option<Response> {
    if registered(app, name) {
        return None;
    }
    let _ = app.refresh_workers(None).await;
    (!registered(app, name)).then(|| error(StatusCode::NOT_FOUND, format!("Unknown task '{name}'")))
}

fn registered(app: &App, name: &str) -> bool {
    let inspected = app.inspected.lock().expect("inspected");
    inspected.values().any(|w| {
        w.get("registered")
            .and_then(Value::as_array)
            .is_some_and(|r| r.iter().any(|n| n.as_str() == Some(name)))
    })
}

async fn publish(app: &App, name: &str, body: Map<String, Value>) -> Result<String, Response> {
    let args = body
        .get("args")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut signature = sig(name, args);
    if let Some(kwargs) = body.get("kwargs").filter(|k| k.is_object()) {
        signature["kwargs"] = kwargs.clone();
    }
    // apply_async options Flower passes through.
    for key in [
        "countdown",
        "eta",
        "expires",
        "queue",
        "priority",
        "routing_key",
        "exchange",
    ] {
        if let Some(v) = body.get(key).filter(|v| !v.is_null()) {
            signature = with_option(signature, key, v.clone());
        }
    }
    match app
        .canvas
        .apply(&signature, &[], ApplyOptions::default())
        .await
    {
        Ok(applied) => Ok(applied.id().to_string()),
        Err(e) => Err(error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
    }
}

async fn async_apply(State(app): Shared, Path(name): Path<String>, body: Bytes) -> Response {
    if !registered(&app, &name) {
        let _ = app.refresh_workers(None).await;
        if !registered(&app, &name) {
            return error(StatusCode::NOT_FOUND, format!("Unknown task '{name}'"));
        }
    }
    let body = match apply_body(&body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    match publish(&app, &name, body).await {
        Ok(id) => {
            let state = app.backend.get(&id).await.ok().flatten();
            ok(
                json!({"task-id": id, "state": state.as_ref().and_then(|m| m.get("status")).and_then(Value::as_str).unwrap_or("PENDING")}),
            )
        }
        Err(r) => r,
    }
}

async fn send_task(State(app): Shared, Path(name): Path<String>, body: Bytes) -> Response {
    let body = match apply_body(&body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    match publish(&app, &name, body).await {
        Ok(id) => {
            let state = app.backend.get(&id).await.ok().flatten();
            ok(
                json!({"task-id": id, "state": state.as_ref().and_then(|m| m.get("status")).and_then(Value::as_str).unwrap_or("PENDING")}),
            )
        }
        Err(r) => r,
    }
}

async fn apply(State(app): Shared, Path(name): Path<String>, body: Bytes) -> Response {
    if !registered(&app, &name) {
        let _ = app.refresh_workers(None).await;
        if !registered(&app, &name) {
            return error(StatusCode::NOT_FOUND, format!("Unknown task '{name}'"));
        }
    }
    let body = match apply_body(&body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let timeout = body
        .get("timeout")
        .and_then(Value::as_f64)
        .map_or(Duration::from_secs(3600), |t| {
            Duration::from_secs_f64(t.max(0.0))
        });
    let id = match publish(&app, &name, body).await {
        Ok(id) => id,
        Err(r) => return r,
    };
    match app.backend.wait(&id, timeout).await {
        Ok(meta) => {
            let answer = result_answer(&id, meta.as_ref());
            if answer.get("result").is_none() {
                // Not ready within `timeout`: Flower answers the id and the state.
                return ok(json!({"task-id": id, "state": answer["state"]}));
            }
            // Flower's apply answers `{"task-id", "result", "state"}` (failure: result, traceback, state).
            let mut out = Map::new();
            out.insert("task-id".into(), json!(id));
            out.insert(
                "result".into(),
                answer.get("result").cloned().unwrap_or(Value::Null),
            );
            if let Some(tb) = answer.get("traceback") {
                out.insert("traceback".into(), tb.clone());
            }
            out.insert("state".into(), answer["state"].clone());
            ok(Value::Object(out))
        }
        Err(e) => internal(e),
    }
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

async fn revoke(
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

async fn rate_limit(
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

async fn timeout(
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

async fn shutdown(State(app): Shared, Path(node): Path<String>) -> Response {
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

async fn pool_action(
    State(app): Shared,
    Path((action, node)): Path<(String, String)>,
    Query(p): Params,
    body: Bytes,
) -> Response {
    worker_action(&app, "pool", &action, &node, &arguments(&p, &body)).await
}

async fn queue_action(
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

async fn queues_length(State(app): Shared) -> Response {
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

/// The web UI's files: embedded in the binary, or read from `CELERIAC_FLOWER_UI_DIR` when set (development).
fn ui_file(name: &str) -> Option<(Vec<u8>, &'static str)> {
    let kind = match name.rsplit('.').next() {
        Some("html") => "text/html; charset=UTF-8",
        Some("js") => "text/javascript; charset=UTF-8",
        Some("css") => "text/css; charset=UTF-8",
        _ => return None,
    };
    if let Ok(dir) = std::env::var("CELERIAC_FLOWER_UI_DIR") {
        if name.contains('/') || name.contains("..") {
            return None;
        }
        return std::fs::read(std::path::Path::new(&dir).join(name))
            .ok()
            .map(|b| (b, kind));
    }
    let body: &'static str = match name {
        "index.html" => include_str!("../ui/index.html"),
        "app.js" => include_str!("../ui/app.js"),
        "app.css" => include_str!("../ui/app.css"),
        _ => return None,
    };
    Some((body.as_bytes().to_vec(), kind))
}

fn serve_ui(name: &str) -> Response {
    match ui_file(name) {
        Some((body, kind)) => {
            (StatusCode::OK, [(header::CONTENT_TYPE, kind)], body).into_response()
        }
        None => error(StatusCode::NOT_FOUND, format!("no such file '{name}'")),
    }
}

/// A page of the single-page UI (it routes on the path itself).
async fn page() -> Response {
    serve_ui("index.html")
}

async fn static_file(Path(file): Path<String>) -> Response {
    serve_ui(&file)
}

/// `/workers?json=1`: Flower's dashboard data (`{"data": [worker, ...]}`); without `json`, the UI page.
async fn workers_page(State(app): Shared, Query(p): Params) -> Response {
    if !flag(&p, "json") {
        return page().await;
    }
    let t = now();
    let cluster = app.cluster.lock().expect("cluster");
    let data: Vec<Value> = cluster.workers.values().map(|w| w.to_json(t)).collect();
    ok(json!({"data": data}))
}

/// `/tasks/datatable`: Flower's DataTables endpoint (`draw`, `start`, `length`, `search[value]`,
/// `order[0][column]`/`order[0][dir]` with `columns[i][data]`), answering `{draw, data, recordsTotal,
/// recordsFiltered}`.
async fn tasks_datatable(State(app): Shared, Query(p): Params) -> Response {
    if let Err(e) = app.flush().await {
        return internal(e);
    }
    let draw: i64 = p.get("draw").and_then(|v| v.parse().ok()).unwrap_or(0);
    let start: u64 = p.get("start").and_then(|v| v.parse().ok()).unwrap_or(0);
    let length: u64 = p.get("length").and_then(|v| v.parse().ok()).unwrap_or(10);
    let search = match p
        .get("search[value]")
        .filter(|s| !s.is_empty())
        .map(|s| crate::search::parse(s))
    {
        None => None,
        Some(Ok(q)) => Some(q),
        Some(Err(e)) => {
            return json_response(StatusCode::BAD_REQUEST, &json!({"error": e.to_string()}));
        }
    };
    let sort_by = p.get("order[0][column]").and_then(|c| {
        let field = p.get(&format!("columns[{c}][data]"))?;
        let desc = p.get("order[0][dir]").is_some_and(|d| d == "desc");
        Some(if desc {
            format!("-{field}")
        } else {
            field.clone()
        })
    });
    let total = match app.store.count().await {
        Ok(n) => n,
        Err(e) => return internal(e),
    };
    let filtered_query = crate::store::TaskQuery {
        search: search.clone(),
        ..Default::default()
    };
    let filtered = if search.is_some() {
        match app.store.list(&filtered_query).await {
            Ok(l) => l.len() as u64,
            Err(e) => return internal(e),
        }
    } else {
        total
    };
    let q = crate::store::TaskQuery {
        limit: Some(length),
        offset: start,
        sort_by,
        search,
        ..Default::default()
    };
    match app.store.list(&q).await {
        Ok(list) => ok(json!({
            "draw": draw,
            "data": list.iter().map(crate::state::TaskRecord::to_json).collect::<Vec<_>>(),
            "recordsTotal": total,
            "recordsFiltered": filtered,
        })),
        Err(e) => internal(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_answers_as_flower() {
        assert_eq!(
            result_answer("t", None),
            json!({"task-id": "t", "state": "PENDING"})
        );
        assert_eq!(
            result_answer("t", Some(&json!({"status": "SUCCESS", "result": 5}))),
            json!({"task-id": "t", "state": "SUCCESS", "result": 5})
        );
        let failure = json!({"status": "FAILURE", "traceback": "tb",
            "result": {"exc_type": "ValueError", "exc_message": ["boom"], "exc_module": "builtins"}});
        assert_eq!(
            result_answer("t", Some(&failure)),
            json!({"task-id": "t", "state": "FAILURE", "result": "ValueError('boom')", "traceback": "tb"})
        );
    }

    #[test]
    fn received_range_minutes() {
        use chrono::TimeZone;
        let local = chrono::Local
            .with_ymd_and_hms(2020, 1, 1, 0, 0, 0)
            .unwrap()
            .timestamp() as f64;
        assert_eq!(parse_minute("2020-01-01 00:00"), Some(local));
        assert_eq!(parse_minute("nope"), None);
    }
}
