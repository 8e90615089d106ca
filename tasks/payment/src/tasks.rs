//! The Celery tasks of the family, registered under their dotted names: `payment.charge`,
//! `payment.refund`, `payment.apply_event` and `payment.status`. Arguments are checked here; each bad one
//! fails the task with a `ValueError` naming it, before anything is written or sent.

use crate::charge::{ChargeArgs, Payments};
use crate::store;
use celeriac_task::{Registry, TaskContext, TaskError, TaskOptions};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;

fn string(field: &str, v: &Value) -> Result<Option<String>, TaskError> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        other => Err(TaskError::value_error(format!(
            "{field}: expected a string, got {other}"
        ))),
    }
}

fn required(field: &str, v: &Value) -> Result<String, TaskError> {
    string(field, v)?
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| TaskError::value_error(format!("{field} is required")))
}

fn positive(field: &str, v: &Value, what: &str) -> Result<i64, TaskError> {
    match v.as_i64() {
        Some(n) if n > 0 && !v.is_boolean() => Ok(n),
        _ => Err(TaskError::value_error(format!(
            "{field}: expected {what}, got {v}"
        ))),
    }
}

/// Checks `payment.charge`'s arguments.
pub fn charge_args(a: [Value; 9]) -> Result<ChargeArgs, TaskError> {
    let [
        tenant,
        order,
        amount,
        currency,
        method,
        customer,
        description,
        metadata,
        attempt,
    ] = a;
    let currency = required("currency", &currency)?;
    if !(currency.len() == 3 && currency.bytes().all(|b| b.is_ascii_lowercase())) {
        return Err(TaskError::value_error(format!(
            "currency: expected an ISO 4217 code in lower case (usd, eur), got {currency:?}"
        )));
    }
    let order_id = required("order_id", &order)?;
    if order_id.len() > 200 {
        return Err(TaskError::value_error("order_id: at most 200 characters"));
    }
    let metadata: HashMap<String, String> = match metadata {
        Value::Null => HashMap::new(),
        Value::Object(m) => {
            if m.len() > 40 {
                return Err(TaskError::value_error(
                    "metadata: at most 40 keys (Stripe allows 50, 3 are ours)",
                ));
            }
            m.into_iter()
                .map(|(k, v)| {
                    if ["tenant_id", "order_id", "attempt"].contains(&k.as_str()) {
                        return Err(TaskError::value_error(format!(
                            "metadata: {k:?} is set by the payment worker"
                        )));
                    }
                    if k.len() > 40 {
                        return Err(TaskError::value_error(format!(
                            "metadata: key {k:?} is longer than 40 characters"
                        )));
                    }
                    let v = match v {
                        Value::String(s) => s,
                        Value::Number(n) => n.to_string(),
                        Value::Bool(b) => b.to_string(),
                        other => {
                            return Err(TaskError::value_error(format!(
                                "metadata: the value of {k:?} must be a string, got {other}"
                            )));
                        }
                    };
                    if v.len() > 500 {
                        return Err(TaskError::value_error(format!(
                            "metadata: the value of {k:?} is longer than 500 characters"
                        )));
                    }
                    Ok((k, v))
                })
                .collect::<Result<_, _>>()?
        }
        other => {
            return Err(TaskError::value_error(format!(
                "metadata: expected a dict, got {other}"
            )));
        }
    };
    let attempt = match attempt {
        Value::Null => 1,
        v => i32::try_from(positive("attempt", &v, "a positive integer")?)
            .map_err(|_| TaskError::value_error("attempt: too large"))?,
    };
    Ok(ChargeArgs {
        tenant: required("tenant_id", &tenant)?,
        order_id,
        amount: positive(
            "amount",
            &amount,
            "a positive integer amount in minor units",
        )?,
        currency,
        payment_method: required("payment_method", &method)?,
        customer: string("customer", &customer)?,
        description: string("description", &description)?,
        metadata,
        attempt,
    })
}

type Charge9 = (
    Value,
    Value,
    Value,
    Value,
    Value,
    Value,
    Value,
    Value,
    Value,
);

/// Registers the tasks over `payments`.
pub fn register(registry: &mut Registry, payments: Arc<Payments>) {
    // A redelivery after a crash must reach the row (and replay): the tasks acknowledge late.
    let late = TaskOptions {
        acks_late: Some(true),
        ..Default::default()
    };
    let p = Arc::clone(&payments);
    registry.task(
        "payment.charge",
        &[
            "tenant_id",
            "order_id",
            "amount",
            "currency",
            "payment_method",
            "customer?",
            "description?",
            "metadata?",
            "attempt?",
        ],
        late.clone(),
        move |ctx: TaskContext, (a, b, c, d, e, f, g, h, i): Charge9| {
            let p = Arc::clone(&p);
            async move {
                p.charge(&ctx, charge_args([a, b, c, d, e, f, g, h, i])?)
                    .await
            }
        },
    );
    let p = Arc::clone(&payments);
    registry.task(
        "payment.refund",
        &["tenant_id", "order_id", "refund_id", "amount?"],
        late.clone(),
        move |ctx: TaskContext,
              (tenant, order, refund_id, amount): (Value, Value, Value, Value)| {
            let p = Arc::clone(&p);
            async move {
                let amount = match amount {
                    Value::Null => None,
                    v => Some(positive(
                        "amount",
                        &v,
                        "a positive integer amount in minor units",
                    )?),
                };
                p.refund(
                    &ctx,
                    &required("tenant_id", &tenant)?,
                    &required("order_id", &order)?,
                    amount,
                    &required("refund_id", &refund_id)?,
                )
                .await
            }
        },
    );
    let p = Arc::clone(&payments);
    registry.task(
        "payment.apply_event",
        &["event_id"],
        late,
        move |_ctx: TaskContext, (id,): (Value,)| {
            let p = Arc::clone(&p);
            async move { p.apply_event(&required("event_id", &id)?).await }
        },
    );
    let p = Arc::clone(&payments);
    registry.task(
        "payment.status",
        &["tenant_id", "order_id"],
        TaskOptions::default(),
        move |_ctx: TaskContext, (tenant, order): (Value, Value)| {
            let p = Arc::clone(&p);
            async move {
                status(
                    &p,
                    &required("tenant_id", &tenant)?,
                    &required("order_id", &order)?,
                )
                .await
            }
        },
    );
}

/// `payment.status`: the order's live (or last) attempt, every attempt, its refunds and the events applied.
async fn status(p: &Payments, tenant: &str, order_id: &str) -> Result<Value, TaskError> {
    let tenant = p.tenants()?.resolve(tenant).await?;
    let tx = p.tx(&tenant).await?;
    let attempts = store::payments_of_order(&tx, order_id).await?;
    let refunds = store::refunds_of_order(&tx, order_id).await?;
    let events = store::events_of_order(&tx, order_id).await?;
    tx.commit().await?;
    let Some(last) = attempts
        .iter()
        .rev()
        .find(|a| a.status != store::PayStatus::Declined)
        .or(attempts.last())
    else {
        return Ok(Value::Null);
    };
    Ok(json!({
        "order_id": order_id,
        "status": last.status.as_str(),
        "payment_intent": last.payment_intent,
        "amount": last.amount,
        "currency": last.currency,
        "refunded": last.refunded,
        "disputed": last.disputed,
        "attempts": attempts.iter().map(|a| json!({"attempt": a.attempt, "status": a.status.as_str(),
            "payment_intent": a.payment_intent, "decline_code": a.decline_code, "tries": a.tries})).collect::<Vec<_>>(),
        "refunds": refunds.iter().map(|r| json!({"refund_id": r.refund_id, "amount": r.amount, "status": r.status,
            "refund": r.stripe_refund})).collect::<Vec<_>>(),
        "events": events,
    }))
}
