//! The `bench.*` tasks. Arithmetic follows Python's `+` and `sum` so results match a Python worker's:
//! integers stay integers, a float anywhere makes a float, strings and lists concatenate, other mixes are
//! a `TypeError` with Python's wording.

use celeriac_worker::task::python_type_name;
use celeriac_worker::{Registry, TaskContext, TaskError, TaskOptions};
use redis::aio::ConnectionManager;
use serde_json::{Number, Value};
use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

/// Registers every bench task.
pub fn register(registry: &mut Registry) {
    let opts = TaskOptions::default;
    registry.variadic_task("bench.noop", opts(), |_ctx, _args, _kwargs| async {
        Ok(Value::Null)
    });
    registry.task(
        "bench.add",
        &["x", "y"],
        opts(),
        |_ctx, (x, y): (Value, Value)| async move { py_add(&x, &y) },
    );
    registry.task(
        "bench.mul",
        &["x", "y"],
        opts(),
        |_ctx, (x, y): (Value, Value)| async move { py_mul(&x, &y) },
    );
    registry.task(
        "bench.echo",
        &["x"],
        opts(),
        |_ctx, (x,): (Value,)| async move { Ok(x) },
    );
    registry.task(
        "bench.sleep",
        &["seconds"],
        opts(),
        |_ctx, (seconds,): (f64,)| async move {
            if !(seconds.is_finite() && seconds >= 0.0) {
                return Err(TaskError::value_error(format!(
                    "sleep length must be non-negative, got {seconds}"
                )));
            }
            tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
            Ok(Value::Null)
        },
    );
    registry.task(
        "bench.xsum",
        &["numbers"],
        opts(),
        |_ctx, (numbers,): (Vec<Value>,)| async move {
            numbers
                .iter()
                .try_fold(Value::from(0), |acc, n| py_add(&acc, n))
        },
    );
    registry.task(
        "bench.mark",
        &["i", "key", "redis_url"],
        opts(),
        |ctx, (i, key, url): (Value, String, String)| async move {
            mark(&ctx, &i, &key, &url).await?;
            Ok(i)
        },
    );
    registry.task(
        "bench.flaky",
        &["times", "countdown"],
        opts(),
        |ctx, (times, countdown): (i64, f64)| async move {
            if ctx.retries < times {
                return Err(TaskError::retry_in(countdown));
            }
            Ok(ctx.retries)
        },
    );
    registry.blocking_task(
        "bench.slow",
        &["seconds"],
        opts(),
        |ctx, (seconds,): (f64,)| {
            // Blocking work that checks for its soft time limit between small steps.
            let deadline = std::time::Instant::now() + Duration::from_secs_f64(seconds.max(0.0));
            while std::time::Instant::now() < deadline {
                if ctx.is_cancelled() {
                    return Ok(true);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(false)
        },
    );
    registry.task(
        "bench.progress",
        &["steps"],
        opts(),
        |ctx, (steps,): (i64,)| async move {
            for done in 1..=steps {
                ctx.update_state(
                    "PROGRESS",
                    serde_json::json!({"done": done, "total": steps}),
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(steps)
        },
    );
    registry.task(
        "bench.fail",
        &["message"],
        opts(),
        |_ctx, (message,): (Value,)| async move {
            let text = message
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| message.to_string());
            Err::<Value, _>(TaskError::value_error(text))
        },
    );
    registry.task(
        "bench.reject",
        &["reason"],
        opts(),
        |_ctx, (reason,): (String,)| async move {
            // `raise Reject(reason, requeue=False)`: dropped, FAILURE Reject stored.
            Err::<Value, _>(TaskError::Reject {
                requeue: false,
                reason,
            })
        },
    );
    registry.task(
        "bench.panic",
        &[],
        opts(),
        |_ctx, _: Vec<Value>| async move {
            panic!("bench.panic was called");
            #[allow(unreachable_code)]
            Ok(Value::Null)
        },
    );
}

/// Python's `x + y` for JSON values.
pub fn py_add(x: &Value, y: &Value) -> Result<Value, TaskError> {
    match (x, y) {
        (Value::Number(a), Value::Number(b)) => {
            if let (Some(a), Some(b)) = (a.as_i64(), b.as_i64())
                && let Some(s) = a.checked_add(b)
            {
                return Ok(Value::from(s));
            }
            let s = a.as_f64().unwrap_or(f64::NAN) + b.as_f64().unwrap_or(f64::NAN);
            Number::from_f64(s)
                .map(Value::Number)
                .ok_or_else(|| TaskError::builtin("OverflowError", "result is not a finite number"))
        }
        (Value::String(a), Value::String(b)) => Ok(Value::String(format!("{a}{b}"))),
        (Value::Array(a), Value::Array(b)) => {
            Ok(Value::Array(a.iter().chain(b).cloned().collect()))
        }
        _ => {
            let msg = match (x, y) {
                (Value::String(_), _) => {
                    format!(
                        "can only concatenate str (not \"{}\") to str",
                        python_type_name(y)
                    )
                }
                (Value::Array(_), _) => format!(
                    "can only concatenate list (not \"{}\") to list",
                    python_type_name(y)
                ),
                _ => format!(
                    "unsupported operand type(s) for +: '{}' and '{}'",
                    python_type_name(x),
                    python_type_name(y)
                ),
            };
            Err(TaskError::type_error(msg))
        }
    }
}

/// Python's `x * y` for numbers (and `str`/`list` times an int).
pub fn py_mul(x: &Value, y: &Value) -> Result<Value, TaskError> {
    match (x, y) {
        (Value::Number(a), Value::Number(b)) => {
            if let (Some(a), Some(b)) = (a.as_i64(), b.as_i64())
                && let Some(p) = a.checked_mul(b)
            {
                return Ok(Value::from(p));
            }
            Number::from_f64(a.as_f64().unwrap_or(f64::NAN) * b.as_f64().unwrap_or(f64::NAN))
                .map(Value::Number)
                .ok_or_else(|| TaskError::builtin("OverflowError", "result is not a finite number"))
        }
        (Value::String(s), Value::Number(n)) | (Value::Number(n), Value::String(s))
            if n.is_i64() =>
        {
            Ok(Value::String(
                s.repeat(n.as_i64().unwrap_or(0).max(0) as usize),
            ))
        }
        _ => Err(TaskError::type_error(format!(
            "unsupported operand type(s) for *: '{}' and '{}'",
            python_type_name(x),
            python_type_name(y)
        ))),
    }
}

static MARK_CONNECTIONS: LazyLock<Mutex<HashMap<String, ConnectionManager>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// Counts one execution once, however often the command is sent: a reply lost to a broken connection
/// is retried with the same execution token. KEYS: the hash, the token key. ARGV: the field.
static MARK: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"if redis.call('SET', KEYS[2], 1, 'NX', 'EX', 3600) then return redis.call('HINCRBY', KEYS[1], ARGV[1], 1) end
          return -1",
    )
});

/// `HINCRBY key i 1` on the Redis at `url`, once per execution. Connections are cached per URL and heal by
/// themselves (a connection manager); while Redis is away the task waits and tries again (up to a minute)
/// with the same execution token, then retries as a task.
async fn mark(ctx: &TaskContext, i: &Value, key: &str, url: &str) -> Result<(), TaskError> {
    let field = i
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| i.to_string());
    let peer = format!(
        "redis:{}",
        redis::parse_redis_url(url)
            .and_then(|u| u.host_str().map(str::to_string))
            .unwrap_or_default()
    );
    let token = format!("{key}:exec:{}", uuid::Uuid::new_v4().simple());
    let started = std::time::Instant::now();
    let mut delay = Duration::from_millis(100);
    loop {
        let error = match connection(url).await {
            Err(TaskError::Failed(e)) if e.exc_type == "ValueError" => {
                return Err(TaskError::Failed(e));
            }
            Err(e) => format!("{e}"),
            Ok(mut conn) => match MARK
                .key(key)
                .key(&token)
                .arg(&field)
                .invoke_async::<i64>(&mut conn)
                .await
            {
                Ok(_) => {
                    ctx.peers.up(&peer);
                    return Ok(());
                }
                Err(e) => e.to_string(),
            },
        };
        ctx.peers.down(&peer, &error);
        if started.elapsed() > Duration::from_secs(60) {
            return Err(TaskError::transient(
                celeriac_worker::task::ExceptionInfo::new(
                    "builtins",
                    "ConnectionError",
                    format!("bench.mark: {error}"),
                ),
                1.0 + celeriac_worker::task::random_unit(),
                Some(-1),
            ));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// The cached, self-healing connection to `url`.
async fn connection(url: &str) -> Result<ConnectionManager, TaskError> {
    let cached = MARK_CONNECTIONS
        .lock()
        .expect("mark connections")
        .get(url)
        .cloned();
    if let Some(c) = cached {
        return Ok(c);
    }
    let client = redis::Client::open(url).map_err(|e| {
        TaskError::value_error(format!("bench.mark: invalid redis_url {url:?}: {e}"))
    })?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(10)))
        .set_number_of_retries(1);
    let c = ConnectionManager::new_with_config(client, config)
        .await
        .map_err(|e| TaskError::builtin("ConnectionError", format!("bench.mark: {e}")))?;
    MARK_CONNECTIONS
        .lock()
        .expect("mark connections")
        .insert(url.to_string(), c.clone());
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn add_follows_python() {
        assert_eq!(py_add(&json!(2), &json!(3)).unwrap(), json!(5));
        assert_eq!(py_add(&json!(2), &json!(0.5)).unwrap(), json!(2.5));
        assert_eq!(py_add(&json!("a"), &json!("b")).unwrap(), json!("ab"));
        assert_eq!(py_add(&json!([1]), &json!([2])).unwrap(), json!([1, 2]));
        let TaskError::Failed(e) = py_add(&json!("a"), &json!([])).unwrap_err() else {
            panic!()
        };
        assert_eq!(e.exc_type, "TypeError");
        assert_eq!(
            e.exc_message,
            vec![json!("can only concatenate str (not \"list\") to str")]
        );
        let TaskError::Failed(e) = py_add(&json!(1), &json!(null)).unwrap_err() else {
            panic!()
        };
        assert_eq!(
            e.exc_message,
            vec![json!(
                "unsupported operand type(s) for +: 'int' and 'NoneType'"
            )]
        );
    }
}
