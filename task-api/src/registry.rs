//! The task registry: tasks registered under their Celery names, written as ordinary async or blocking Rust
//! functions with typed parameters. Arguments arrive as Celery's `args` and `kwargs`; they are bound to the
//! declared parameter names the way Python binds a call, then deserialized into the function's parameter
//! type, and every mismatch becomes a Python `TypeError` the caller can read.

use crate::context::TaskContext;
use crate::error::TaskError;
use crate::options::TaskOptions;
use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

/// How a parameter list binds.
#[derive(Debug, Clone)]
pub enum Params {
    /// Named parameters; a trailing `?` marks an optional one (`"countdown?"`).
    Named(Vec<&'static str>),
    /// `*args, **kwargs`: everything is passed through as `(Vec<Value>, Map)`.
    Variadic,
}

type AsyncHandler =
    dyn Fn(TaskContext, Value) -> BoxFuture<'static, Result<Value, TaskError>> + Send + Sync;
type BlockingHandler = dyn Fn(TaskContext, Value) -> Result<Value, TaskError> + Send + Sync;

/// How a task runs.
#[derive(Clone)]
pub enum Handler {
    /// On the async runtime.
    Async(Arc<AsyncHandler>),
    /// On the blocking thread pool, off the async runtime.
    Blocking(Arc<BlockingHandler>),
}

/// A registered task.
#[derive(Clone)]
pub struct RegisteredTask {
    /// Celery name.
    pub name: String,
    /// Parameter binding.
    pub params: Params,
    /// Options.
    pub options: TaskOptions,
    /// The function.
    pub handler: Handler,
}

impl std::fmt::Debug for RegisteredTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisteredTask")
            .field("name", &self.name)
            .field("params", &self.params)
            .finish()
    }
}

impl RegisteredTask {
    /// Binds Celery `args`/`kwargs` to this task's parameters (Python call semantics), giving the value the
    /// handler deserializes: an array in parameter order, or `[args, kwargs]` for variadic tasks.
    pub fn bind(
        &self,
        args: Vec<Value>,
        mut kwargs: Map<String, Value>,
    ) -> Result<Value, TaskError> {
        let names = match &self.params {
            Params::Variadic => {
                return Ok(Value::Array(vec![
                    Value::Array(args),
                    Value::Object(kwargs),
                ]));
            }
            Params::Named(names) => names,
        };
        let name = &self.name;
        let total = names.len();
        let required = names.iter().filter(|n| !n.ends_with('?')).count();
        if args.len() > total {
            return Err(TaskError::type_error(format!(
                "{name}() takes {total} positional argument{} but {} {} given",
                if total == 1 { "" } else { "s" },
                args.len(),
                if args.len() == 1 { "was" } else { "were" }
            )));
        }
        let mut bound = args;
        let mut missing = Vec::new();
        for (i, raw) in names.iter().enumerate() {
            let pname = raw.trim_end_matches('?');
            if i < bound.len() {
                if kwargs.contains_key(pname) {
                    return Err(TaskError::type_error(format!(
                        "{name}() got multiple values for argument '{pname}'"
                    )));
                }
                continue;
            }
            match kwargs.shift_remove(pname) {
                Some(v) => bound.push(v),
                None if raw.ends_with('?') => bound.push(Value::Null),
                None => {
                    missing.push(format!("'{pname}'"));
                    bound.push(Value::Null);
                }
            }
        }
        if !missing.is_empty() {
            return Err(TaskError::type_error(format!(
                "{name}() missing {} required positional argument{}: {}",
                missing.len(),
                if missing.len() == 1 { "" } else { "s" },
                missing.join(" and ")
            )));
        }
        if let Some(extra) = kwargs.keys().next() {
            return Err(TaskError::type_error(format!(
                "{name}() got an unexpected keyword argument '{extra}'"
            )));
        }
        let _ = required;
        Ok(Value::Array(bound))
    }
}

fn decode_params<A: DeserializeOwned>(task: &str, v: Value) -> Result<A, TaskError> {
    serde_json::from_value(v).map_err(|e| {
        TaskError::type_error(format!(
            "{task}() received arguments of the wrong type: {e}"
        ))
    })
}

fn encode_result<R: Serialize>(task: &str, r: R) -> Result<Value, TaskError> {
    serde_json::to_value(r).map_err(|e| {
        TaskError::builtin(
            "TypeError",
            format!("{task}() returned a value that cannot be serialized: {e}"),
        )
    })
}

/// Tasks by name.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    tasks: HashMap<String, Arc<RegisteredTask>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Looks a task up by name.
    pub fn get(&self, name: &str) -> Option<&Arc<RegisteredTask>> {
        self.tasks.get(name)
    }

    /// Registered names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<_> = self.tasks.keys().cloned().collect();
        v.sort();
        v
    }

    fn insert(&mut self, name: &str, params: Params, options: TaskOptions, handler: Handler) {
        self.tasks.insert(
            name.to_string(),
            Arc::new(RegisteredTask {
                name: name.to_string(),
                params,
                options,
                handler,
            }),
        );
    }

    /// Registers an async task. `A` is the parameter tuple (`(i64, i64)`), bound from `params` names.
    pub fn task<A, R, F, Fut>(
        &mut self,
        name: &str,
        params: &[&'static str],
        options: TaskOptions,
        f: F,
    ) where
        A: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(TaskContext, A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, TaskError>> + Send + 'static,
    {
        let f = Arc::new(f);
        let task = name.to_string();
        let handler: Arc<AsyncHandler> = Arc::new(move |ctx, v| {
            let f = Arc::clone(&f);
            let task = task.clone();
            Box::pin(async move {
                let a = decode_params::<A>(&task, v)?;
                encode_result(&task, f(ctx, a).await?)
            })
        });
        self.insert(
            name,
            Params::Named(params.to_vec()),
            options,
            Handler::Async(handler),
        );
    }

    /// Registers a blocking task: it runs on the blocking pool, never on the async runtime.
    pub fn blocking_task<A, R, F>(
        &mut self,
        name: &str,
        params: &[&'static str],
        options: TaskOptions,
        f: F,
    ) where
        A: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(TaskContext, A) -> Result<R, TaskError> + Send + Sync + 'static,
    {
        let task = name.to_string();
        let handler: Arc<BlockingHandler> =
            Arc::new(move |ctx, v| encode_result(&task, f(ctx, decode_params::<A>(&task, v)?)?));
        self.insert(
            name,
            Params::Named(params.to_vec()),
            options,
            Handler::Blocking(handler),
        );
    }

    /// Registers an async task taking `*args, **kwargs` as they come.
    pub fn variadic_task<R, F, Fut>(&mut self, name: &str, options: TaskOptions, f: F)
    where
        R: Serialize + Send + 'static,
        F: Fn(TaskContext, Vec<Value>, Map<String, Value>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, TaskError>> + Send + 'static,
    {
        let f = Arc::new(f);
        let task = name.to_string();
        let handler: Arc<AsyncHandler> = Arc::new(move |ctx, v| {
            let f = Arc::clone(&f);
            let task = task.clone();
            Box::pin(async move {
                let (args, kwargs) = decode_params::<(Vec<Value>, Map<String, Value>)>(&task, v)?;
                encode_result(&task, f(ctx, args, kwargs).await?)
            })
        });
        self.insert(name, Params::Variadic, options, Handler::Async(handler));
    }

    /// Applies per-task option overrides (from `task_annotations`) to a registered task.
    pub fn annotate(&mut self, name: &str, options: TaskOptions) {
        let o = options;
        if let Some(t) = self.tasks.get_mut(name) {
            let t = &mut Arc::make_mut(t).options;
            t.acks_late = o.acks_late.or(t.acks_late);
            t.ignore_result = o.ignore_result.or(t.ignore_result);
            t.reject_on_worker_lost = o.reject_on_worker_lost.or(t.reject_on_worker_lost);
            t.acks_on_failure_or_timeout = o
                .acks_on_failure_or_timeout
                .or(t.acks_on_failure_or_timeout);
            t.track_started = o.track_started.or(t.track_started);
            t.max_retries = o.max_retries.or(t.max_retries);
            t.default_retry_delay = o.default_retry_delay.or(t.default_retry_delay);
            t.autoretry_for = o.autoretry_for.or(t.autoretry_for.take());
            t.retry_backoff = o.retry_backoff.or(t.retry_backoff);
            t.retry_backoff_max = o.retry_backoff_max.or(t.retry_backoff_max);
            t.retry_jitter = o.retry_jitter.or(t.retry_jitter);
            t.time_limit = o.time_limit.or(t.time_limit);
            t.soft_time_limit = o.soft_time_limit.or(t.soft_time_limit);
            t.rate_limit = o.rate_limit.or(t.rate_limit);
        }
    }

    /// Every registered task.
    pub fn tasks(&self) -> impl Iterator<Item = &Arc<RegisteredTask>> {
        self.tasks.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::{RateLimit, backoff};
    use serde_json::json;

    fn add_task() -> Arc<RegisteredTask> {
        let mut r = Registry::new();
        r.task(
            "t.add",
            &["x", "y", "z?"],
            TaskOptions::default(),
            |_ctx, (x, y, z): (i64, i64, Option<i64>)| async move { Ok(x + y + z.unwrap_or(0)) },
        );
        r.get("t.add").unwrap().clone()
    }

    fn kw(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn binds_like_python() {
        let t = add_task();
        assert_eq!(
            t.bind(vec![json!(1), json!(2)], Map::new()).unwrap(),
            json!([1, 2, null])
        );
        assert_eq!(
            t.bind(vec![json!(1)], kw(json!({"y": 5}))).unwrap(),
            json!([1, 5, null])
        );
        assert_eq!(
            t.bind(vec![], kw(json!({"z": 3, "y": 2, "x": 1}))).unwrap(),
            json!([1, 2, 3])
        );
    }

    #[test]
    fn binding_errors_read_like_python() {
        let t = add_task();
        let msg = |e: TaskError| match e {
            TaskError::Failed(x) => (x.exc_type, x.exc_message[0].as_str().unwrap().to_string()),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            msg(t.bind(vec![json!(1)], Map::new()).unwrap_err()),
            (
                "TypeError".into(),
                "t.add() missing 1 required positional argument: 'y'".into()
            )
        );
        assert_eq!(
            msg(t
                .bind(vec![json!(1), json!(2), json!(3), json!(4)], Map::new())
                .unwrap_err()),
            (
                "TypeError".into(),
                "t.add() takes 3 positional arguments but 4 were given".into()
            )
        );
        assert_eq!(
            msg(t.bind(vec![json!(1)], kw(json!({"x": 2}))).unwrap_err()),
            (
                "TypeError".into(),
                "t.add() got multiple values for argument 'x'".into()
            )
        );
        assert_eq!(
            msg(t
                .bind(vec![json!(1), json!(2)], kw(json!({"w": 2})))
                .unwrap_err()),
            (
                "TypeError".into(),
                "t.add() got an unexpected keyword argument 'w'".into()
            )
        );
    }

    #[test]
    fn rate_limits_parse_like_celery() {
        use std::time::Duration;
        assert_eq!(
            RateLimit::parse("10/s", false).unwrap().interval,
            Duration::from_millis(100)
        );
        assert_eq!(
            RateLimit::parse("100/m", false).unwrap().interval,
            Duration::from_millis(600)
        );
        assert_eq!(
            RateLimit::parse("1000/h", true).unwrap().interval,
            Duration::from_millis(3600)
        );
        assert_eq!(
            RateLimit::parse("4", false).unwrap().interval,
            Duration::from_millis(250)
        );
        assert!(
            RateLimit::parse("10/d", false)
                .unwrap_err()
                .contains("unknown unit")
        );
        assert!(RateLimit::parse("0/s", false).is_err());
    }

    #[test]
    fn backoff_matches_celery_formula() {
        // No jitter: factor * 2^retries, capped.
        assert_eq!(backoff(1.0, 0, 600.0, false, 0.5), 1.0);
        assert_eq!(backoff(1.0, 3, 600.0, false, 0.5), 8.0);
        assert_eq!(backoff(2.0, 10, 600.0, false, 0.5), 600.0);
        // Full jitter: randrange(countdown + 1), so a whole number within [0, countdown].
        assert_eq!(backoff(1.0, 3, 600.0, true, 0.0), 0.0);
        assert_eq!(backoff(1.0, 3, 600.0, true, 0.999), 8.0);
        for i in 0..100 {
            let c = backoff(1.0, 5, 20.0, true, f64::from(i) / 100.0);
            assert!((0.0..=20.0).contains(&c) && c.fract() == 0.0, "{c}");
        }
    }

    #[tokio::test]
    async fn wrong_types_are_type_errors() {
        let t = add_task();
        let Handler::Async(h) = &t.handler else {
            panic!()
        };
        let ctx = TaskContext::detached("1", "t.add");
        assert_eq!(h(ctx.clone(), json!([1, 2, 3])).await.unwrap(), json!(6));
        let err = h(ctx, json!(["a", 2, null])).await.unwrap_err();
        let TaskError::Failed(e) = err else { panic!() };
        assert_eq!(e.exc_type, "TypeError");
        assert!(e.exc_message[0].as_str().unwrap().starts_with(
            "t.add() received arguments of the wrong type: invalid type: string \"a\""
        ));
    }
}
