//! Tasks in Flower's API: `/api/tasks` (filters, sorting, paging as Flower), `/api/task/types`,
//! `/api/task/info/<id>`, `/api/task/result/<id>` and sending tasks (`apply`, `async-apply`, `send-task`).

use super::*;

/// Flower's `received_start`/`received_end`: `%Y-%m-%d %H:%M` in this process's local time (`mktime`).
pub(super) fn parse_minute(s: &str) -> Option<f64> {
    use chrono::TimeZone;
    let naive = chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M").ok()?;
    chrono::Local
        .from_local_datetime(&naive)
        .earliest()
        .map(|t| t.timestamp() as f64)
}

/// Flower's sortable task fields.
pub(super) const SORT_KEYS: [&str; 4] = ["name", "received", "started", "state"];

/// An optional integer argument; Flower answers 400 to a non-number.
pub(super) fn int_arg(p: &HashMap<String, String>, key: &str) -> Result<Option<i64>, Response> {
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

pub(super) async fn tasks(State(app): Shared, Query(p): Params) -> Response {
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

pub(super) async fn task_types(State(app): Shared) -> Response {
    if let Err(e) = app.flush().await {
        return internal(e);
    }
    match app.store.types().await {
        Ok(t) => ok(json!({"task-types": t})),
        Err(e) => internal(e),
    }
}

pub(super) async fn task_info(State(app): Shared, Path(id): Path<String>) -> Response {
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

pub(super) async fn task_result(
    State(app): Shared,
    Path(id): Path<String>,
    Query(p): Params,
) -> Response {
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
pub(super) async fn unknown_task(app: &App, name: &str) -> Option<Response> {
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

pub(super) async fn async_apply(
    State(app): Shared,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
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

pub(super) async fn send_task(
    State(app): Shared,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
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

pub(super) async fn apply(State(app): Shared, Path(name): Path<String>, body: Bytes) -> Response {
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
