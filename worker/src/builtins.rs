//! Celery's built-in tasks a worker must know for canvases: `celery.map` and `celery.starmap` (what
//! `task.map(...)`, `task.starmap(...)` and `task.chunks(...)` send) run the named task's function inline for
//! every item and return the list of results, like Celery; `celery.chunks` publishes the group of starmaps
//! and returns its result tuple.

use celeriac_task::{Handler, Registry, TaskContext, TaskError, TaskOptions};
use serde_json::{Map, Value};
use std::sync::{Arc, OnceLock};

/// The registry plus the built-ins (which look tasks up in the final registry).
pub fn with_builtins(mut registry: Registry) -> Registry {
    let cell: Arc<OnceLock<Registry>> = Arc::new(OnceLock::new());
    for (name, star) in [("celery.starmap", true), ("celery.map", false)] {
        let cell = Arc::clone(&cell);
        registry.variadic_task(name, TaskOptions::default(), move |ctx, args, kwargs| {
            let registry = cell.get().cloned();
            async move {
                let registry = registry
                    .ok_or_else(|| TaskError::builtin("RuntimeError", "registry not ready"))?;
                map_items(&registry, ctx, star, args, kwargs).await
            }
        });
    }
    registry.variadic_task("celery.chunks", TaskOptions::default(), |ctx, args, mut kwargs| async move {
        let mut args = args.into_iter();
        let task = kwargs.remove("task").or_else(|| args.next()).unwrap_or(Value::Null);
        let it = kwargs.remove("it").or_else(|| args.next()).unwrap_or(Value::Null);
        let n = kwargs.remove("n").or_else(|| args.next()).unwrap_or(Value::from(1));
        let sig = serde_json::json!({"task": "celery.chunks", "args": [], "kwargs": {"task": task, "it": it, "n": n},
            "options": {}, "subtask_type": "chunks", "immutable": false});
        ctx.apply(&sig).await
    });
    let _ = cell.set(registry.clone());
    registry
}

async fn map_items(
    registry: &Registry,
    ctx: TaskContext,
    star: bool,
    args: Vec<Value>,
    mut kwargs: Map<String, Value>,
) -> Result<Value, TaskError> {
    let mut args = args.into_iter();
    let sig = kwargs
        .remove("task")
        .or_else(|| args.next())
        .unwrap_or(Value::Null);
    let items = kwargs
        .remove("it")
        .or_else(|| args.next())
        .unwrap_or(Value::Null);
    let name = sig
        .get("task")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let task = registry.get(&name).cloned().ok_or_else(|| {
        TaskError::exception(
            Some("celery.exceptions"),
            "NotRegistered",
            vec![Value::String(name.clone())],
        )
    })?;
    let Value::Array(items) = items else {
        return Err(TaskError::type_error(format!(
            "{}: 'it' must be a list",
            ctx.name
        )));
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let positional = match (star, item) {
            (true, Value::Array(a)) => a,
            (true, other) => {
                return Err(TaskError::type_error(format!(
                    "{name}() argument after * must be an iterable, not {other}"
                )));
            }
            (false, v) => vec![v],
        };
        let bound = task.bind(positional, Map::new())?;
        let mut item_ctx = ctx.clone();
        item_ctx.name = name.clone();
        let value = match &task.handler {
            Handler::Async(h) => h(item_ctx, bound).await?,
            Handler::Blocking(h) => {
                let h = Arc::clone(h);
                tokio::task::spawn_blocking(move || h(item_ctx, bound))
                    .await
                    .map_err(|e| TaskError::builtin("RuntimeError", e.to_string()))??
            }
        };
        out.push(value);
    }
    Ok(Value::Array(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn starmap_and_map_run_the_task_per_item() {
        let mut r = Registry::new();
        r.task(
            "t.add",
            &["x", "y"],
            TaskOptions::default(),
            |_ctx, (x, y): (i64, i64)| async move { Ok(x + y) },
        );
        r.task(
            "t.echo",
            &["x"],
            TaskOptions::default(),
            |_ctx, (x,): (Value,)| async move { Ok(x) },
        );
        let r = with_builtins(r);
        let call = |name: &str, kwargs: Value| {
            let t = r.get(name).unwrap().clone();
            let bound = t.bind(vec![], kwargs.as_object().unwrap().clone()).unwrap();
            async move {
                let Handler::Async(h) = &t.handler else {
                    panic!()
                };
                h(TaskContext::detached("1", "x"), bound).await
            }
        };
        let star = call(
            "celery.starmap",
            json!({"task": {"task": "t.add"}, "it": [[1, 1], [2, 3]]}),
        )
        .await;
        assert_eq!(star.unwrap(), json!([2, 5]));
        let map = call(
            "celery.map",
            json!({"task": {"task": "t.echo"}, "it": [1, "a"]}),
        )
        .await;
        assert_eq!(map.unwrap(), json!([1, "a"]));
        let missing = call("celery.map", json!({"task": {"task": "t.nope"}, "it": [1]})).await;
        assert!(matches!(missing, Err(TaskError::Failed(e)) if e.exc_type == "NotRegistered"));
    }
}
