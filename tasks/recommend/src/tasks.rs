//! The Celery tasks of the family, registered under their dotted names. Arguments are checked before any
//! work: a history or product list that is not a list, an unknown `kind`, a bad `at`, or `k` outside
//! `1..=1000` fail with `ValueError`; an unknown tenant fails with `UnknownTenant`.

use crate::Recommend;
use crate::store::Record;
use celeriac_task::{Registry, TaskContext, TaskError, TaskOptions, id_arg};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use std::sync::Arc;

/// Longest list of product ids a task takes.
const MAX_IDS: usize = 10_000;

/// `k`, 10 when absent.
pub fn k_of(k: Option<i64>) -> Result<usize, TaskError> {
    let k = k.unwrap_or(10);
    if !(1..=1000).contains(&k) {
        return Err(TaskError::value_error(format!(
            "k: {k} is not between 1 and 1000"
        )));
    }
    Ok(k as usize)
}

/// A list of ids (`None` is an empty list).
pub fn ids_of(name: &str, v: Option<&Value>) -> Result<Vec<String>, TaskError> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => {
            if items.len() > MAX_IDS {
                return Err(TaskError::value_error(format!(
                    "{name}: {} ids, at most {MAX_IDS}",
                    items.len()
                )));
            }
            items.iter().map(|i| id_arg(name, i)).collect()
        }
        Some(other) => Err(TaskError::value_error(format!(
            "{name}: expected a list of product ids, got {}",
            celeriac_task::python_type_name(other)
        ))),
    }
}

/// `kind`: `view`, `cart` or `purchase`.
pub fn kind_of(kind: Option<String>) -> Result<&'static str, TaskError> {
    match kind.as_deref().unwrap_or("view") {
        "view" => Ok("view"),
        "cart" => Ok("cart"),
        "purchase" => Ok("purchase"),
        other => Err(TaskError::value_error(format!(
            "kind: {other:?} is not one of 'view', 'cart', 'purchase'"
        ))),
    }
}

/// `at`: an ISO 8601 time (with an offset, or UTC when it has none) or seconds since the epoch; now when
/// absent.
pub fn at_of(at: Option<&Value>) -> Result<DateTime<Utc>, TaskError> {
    let bad = |v: &Value| {
        TaskError::value_error(format!("at: {v} is not an ISO 8601 time or a Unix time"))
    };
    match at {
        None | Some(Value::Null) => Ok(Utc::now()),
        Some(Value::Number(n)) => n
            .as_f64()
            .and_then(|s| DateTime::from_timestamp_micros((s * 1e6) as i64))
            .ok_or_else(|| bad(&Value::Number(n.clone()))),
        Some(Value::String(s)) => DateTime::parse_from_rfc3339(s)
            .map(|t| t.with_timezone(&Utc))
            .or_else(|_| {
                chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
                    .map(|t| t.and_utc())
            })
            .map_err(|_| bad(&Value::String(s.clone()))),
        Some(other) => Err(bad(other)),
    }
}

/// Registers the tasks over `rec`.
pub fn register(registry: &mut Registry, rec: Arc<Recommend>) {
    let r = Arc::clone(&rec);
    registry.task(
        "recommend.record",
        &[
            "tenant_id",
            "customer_id",
            "product_id",
            "kind?",
            "at?",
            "event_id?",
        ],
        TaskOptions::default(),
        move |ctx: TaskContext,
              (tenant, customer, product, kind, at, event): (
            String,
            Value,
            Value,
            Option<String>,
            Option<Value>,
            Option<Value>,
        )| {
            let r = Arc::clone(&r);
            async move {
                // Once per event: the storefront's id when it sends one, else this task's id (a message
                // redelivered after the row was committed carries the same id).
                let key = match event.as_ref().filter(|v| !v.is_null()) {
                    Some(e) => format!("event:{}", id_arg("event_id", e)?),
                    None if ctx.id.is_empty() || ctx.id.len() > 256 => {
                        return Err(TaskError::value_error(
                            "the task id is not 1 to 256 characters: pass an event_id",
                        ));
                    }
                    None => format!("task:{}", ctx.id),
                };
                let record = Record {
                    customer_id: id_arg("customer_id", &customer)?,
                    product_id: id_arg("product_id", &product)?,
                    kind: kind_of(kind)?,
                    at: at_of(at.as_ref())?,
                    key,
                };
                let at = record
                    .at
                    .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
                let tenant = r.tenant(&tenant).await?;
                let written = r.record(tenant, record).await?;
                Ok(json!({"recorded": true, "duplicate": !written, "at": at}))
            }
        },
    );
    let r = Arc::clone(&rec);
    registry.task(
        "recommend.train",
        &["tenant_id", "epochs?", "seed?"],
        TaskOptions::default(),
        move |_ctx: TaskContext, (tenant, epochs, seed): (String, Option<i64>, Option<i64>)| {
            let r = Arc::clone(&r);
            async move {
                let epochs = match epochs {
                    None => None,
                    Some(e) if (1..=10_000).contains(&e) => Some(e as usize),
                    Some(e) => {
                        return Err(TaskError::value_error(format!(
                            "epochs: {e} is not between 1 and 10000"
                        )));
                    }
                };
                let seed = match seed {
                    Some(s) if s < 0 => {
                        return Err(TaskError::value_error("seed: must not be negative"));
                    }
                    s => s.map(|s| s as u64),
                };
                let tenant = r.tenant(&tenant).await?;
                r.train(&tenant, epochs, seed).await
            }
        },
    );
    let r = Arc::clone(&rec);
    registry.task(
        "recommend.train_all",
        &[],
        TaskOptions::default(),
        move |_ctx: TaskContext, (): ()| {
            let r = Arc::clone(&r);
            async move {
                let mut results = serde_json::Map::new();
                for tenant in r.all_tenants().await? {
                    let outcome = match r.train(&tenant, None, None).await {
                        Ok(v) => v,
                        Err(e) => json!({"error": e.to_string()}),
                    };
                    results.insert(tenant.slug.clone(), outcome);
                }
                Ok::<_, TaskError>(Value::Object(results))
            }
        },
    );
    register_answers(registry, rec);
}

fn register_answers(registry: &mut Registry, rec: Arc<Recommend>) {
    let r = Arc::clone(&rec);
    registry.task(
        "recommend.next_items",
        &["tenant_id", "history", "k?", "exclude?"],
        TaskOptions::default(),
        move |_ctx: TaskContext,
              (tenant, history, k, exclude): (String, Value, Option<i64>, Option<Value>)| {
            let r = Arc::clone(&r);
            async move {
                let history = ids_of("history", Some(&history))?;
                let exclude = ids_of("exclude", exclude.as_ref())?;
                let k = k_of(k)?;
                let tenant = r.tenant(&tenant).await?;
                r.next_items(&tenant, history, k, exclude).await
            }
        },
    );
    let r = Arc::clone(&rec);
    registry.task(
        "recommend.for_customer",
        &["tenant_id", "customer_id", "k?"],
        TaskOptions::default(),
        move |_ctx: TaskContext, (tenant, customer, k): (String, Value, Option<i64>)| {
            let r = Arc::clone(&r);
            async move {
                let customer = id_arg("customer_id", &customer)?;
                let k = k_of(k)?;
                let tenant = r.tenant(&tenant).await?;
                r.for_customer(&tenant, &customer, k).await
            }
        },
    );
    let r = Arc::clone(&rec);
    registry.task(
        "recommend.similar",
        &["tenant_id", "product_id", "k?"],
        TaskOptions::default(),
        move |_ctx: TaskContext, (tenant, product, k): (String, Value, Option<i64>)| {
            let r = Arc::clone(&r);
            async move {
                let product = id_arg("product_id", &product)?;
                let k = k_of(k)?;
                let tenant = r.tenant(&tenant).await?;
                r.similar(&tenant, &product, k).await
            }
        },
    );
    let r = Arc::clone(&rec);
    registry.task(
        "recommend.complete_outfit",
        &["tenant_id", "product_ids", "k?"],
        TaskOptions::default(),
        move |_ctx: TaskContext, (tenant, products, k): (String, Value, Option<i64>)| {
            let r = Arc::clone(&r);
            async move {
                let products = ids_of("product_ids", Some(&products))?;
                let k = k_of(k)?;
                let tenant = r.tenant(&tenant).await?;
                r.complete_outfit(&tenant, products, k).await
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_checked() {
        assert_eq!(k_of(None).unwrap(), 10);
        assert!(
            k_of(Some(0))
                .unwrap_err()
                .to_string()
                .contains("k: 0 is not between 1 and 1000")
        );
        assert_eq!(
            ids_of("history", Some(&json!(["a", 7]))).unwrap(),
            vec!["a", "7"]
        );
        let e = ids_of("history", Some(&json!("a,b")))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("history: expected a list of product ids, got str"),
            "{e}"
        );
        let e = ids_of("history", Some(&json!([1.5])))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("expected a string or an integer id, got float"),
            "{e}"
        );
        assert!(
            kind_of(Some("like".into()))
                .unwrap_err()
                .to_string()
                .contains("is not one of")
        );
        assert_eq!(kind_of(None).unwrap(), "view");
        assert_eq!(
            at_of(Some(&json!("2026-01-02T03:04:05Z"))).unwrap(),
            at_of(Some(&json!(1767323045))).unwrap()
        );
        assert!(at_of(Some(&json!("yesterday"))).is_err());
    }
}
