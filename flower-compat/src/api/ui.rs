//! The web UI: the embedded pages and static files, the workers page and the tasks datatable.

use super::*;

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
        "index.html" => include_str!("../../ui/index.html"),
        "app.js" => include_str!("../../ui/app.js"),
        "app.css" => include_str!("../../ui/app.css"),
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
pub(super) async fn page() -> Response {
    serve_ui("index.html")
}

pub(super) async fn static_file(Path(file): Path<String>) -> Response {
    serve_ui(&file)
}

/// `/workers?json=1`: Flower's dashboard data (`{"data": [worker, ...]}`); without `json`, the UI page.
pub(super) async fn workers_page(State(app): Shared, Query(p): Params) -> Response {
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
pub(super) async fn tasks_datatable(State(app): Shared, Query(p): Params) -> Response {
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
