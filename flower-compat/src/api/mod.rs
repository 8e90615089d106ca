//! Flower 2.2's HTTP API on axum: the same paths, parameters, status codes, messages and JSON shapes
//! (`/api/workers`, `/api/tasks`, `/api/task/...`, `/api/worker/...`, `/api/queues/length`, `/metrics`,
//! `/healthcheck`). Authentication as Flower: with basic auth configured everything but `/healthcheck` and
//! `/metrics` needs it; without, the API answers 401 unless unauthenticated access was switched on. Read-only
//! mode answers 403 to every request that would change something.

//!
//! # Layout
//! This file holds the router, authentication, `/healthcheck`, `/metrics` and the answer helpers:
//! - `tasks`: listing, inspecting and sending tasks;
//! - `workers`: listing workers and remote control;
//! - `ui`: the web pages and their data.

// Handlers answer errors with a ready `Response`; boxing it buys nothing on this path.
#![allow(clippy::result_large_err)]

mod tasks;
mod ui;
mod workers;

use crate::state::TaskEvents;
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
use tasks::{apply, async_apply, send_task, task_info, task_result, task_types, tasks};
use ui::{page, static_file, tasks_datatable, workers_page};
use workers::{
    pool_action, queue_action, queues_length, rate_limit, revoke, shutdown, timeout, workers,
};

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

/// A Flower list parameter: absent, empty or `All` means no filter.
fn filter(p: &HashMap<String, String>, key: &str) -> Option<String> {
    p.get(key).filter(|v| !v.is_empty() && *v != "All").cloned()
}
