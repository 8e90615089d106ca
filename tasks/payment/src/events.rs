//! Stripe webhooks: the HTTP endpoint (`POST /webhooks/stripe`, served by `celeriac webhooks`) verifies
//! `Stripe-Signature` (HMAC-SHA256, 300 s tolerance), stores each event once (`stripe_events`, keyed by its
//! id), answers 200 and enqueues `payment.apply_event(event_id)`; `apply_event` applies forward transitions
//! only, in the transaction that marks the event processed, so duplicate and out-of-order deliveries change
//! nothing twice.

use crate::charge::Payments;
use crate::metrics::PaymentMetrics;
use crate::store::{self, PayStatus};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use celeriac_domain::{Db, Tenant, TenantTx};
use celeriac_task::TaskError;
use futures::future::BoxFuture;
use serde_json::{Value, json};
use std::sync::Arc;
use tracing::{info, warn};

/// Publishes `payment.apply_event(event_id)` (the caller owns the broker).
pub type EnqueueEvent = Arc<dyn Fn(String) -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// What the endpoint needs.
#[derive(Clone)]
pub struct Endpoint {
    /// The signing secret.
    pub secret: Arc<str>,
    /// The domain database.
    pub db: Db,
    /// Enqueues the event's application.
    pub enqueue: EnqueueEvent,
    /// Metrics.
    pub metrics: Arc<PaymentMetrics>,
    /// Metrics text for `/metrics`.
    pub render_metrics: Arc<dyn Fn() -> String + Send + Sync>,
}

/// The PaymentIntent an event is about.
pub fn intent_of(kind: &str, payload: &Value) -> Option<String> {
    let object = &payload["data"]["object"];
    let field = if kind.starts_with("payment_intent.") {
        &object["id"]
    } else {
        &object["payment_intent"]
    };
    match field {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("id").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// The router: `POST /webhooks/stripe`, `GET /metrics`, `GET /health`.
pub fn router(endpoint: Endpoint) -> Router {
    Router::new()
        .route("/webhooks/stripe", post(receive))
        .route(
            "/metrics",
            get(|State(e): State<Endpoint>| async move { (e.render_metrics)() }),
        )
        .route("/health", get(|| async { "ok" }))
        .with_state(endpoint)
}

async fn receive(
    State(e): State<Endpoint>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let Ok(text) = std::str::from_utf8(&body) else {
        e.metrics.signature_failure();
        return (StatusCode::BAD_REQUEST, "the body is not UTF-8".into());
    };
    let Some(sig) = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok())
    else {
        e.metrics.signature_failure();
        return (StatusCode::BAD_REQUEST, "missing Stripe-Signature".into());
    };
    let event = match stripe_webhook::Webhook::construct_event(text, sig, &e.secret) {
        Ok(ev) => ev,
        Err(err) => {
            e.metrics.signature_failure();
            warn!(error = %err, "webhook refused: {err}");
            return (StatusCode::BAD_REQUEST, format!("invalid event: {err}"));
        }
    };
    let payload: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(err) => return (StatusCode::BAD_REQUEST, format!("invalid JSON: {err}")),
    };
    let id = event.id.as_str().to_string();
    let kind = payload["type"].as_str().unwrap_or_default().to_string();
    let intent = intent_of(&kind, &payload);
    let fresh = match store::store_event(e.db.conn(), &id, &kind, &payload, intent.as_deref()).await
    {
        Ok(needs) => needs,
        Err(err) => {
            warn!(error = %err, event = %id, "storing a webhook event failed; Stripe will deliver it again");
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "storage unavailable".into(),
            );
        }
    };
    e.metrics.event(&kind, !fresh);
    if fresh {
        // Not applied yet (new, or a redelivery of one whose task was lost): enqueue; applying is idempotent.
        if let Err(err) = (e.enqueue)(id.clone()).await {
            warn!(error = %err, event = %id, "enqueueing payment.apply_event failed; Stripe will deliver it again");
            return (StatusCode::SERVICE_UNAVAILABLE, "queue unavailable".into());
        }
    }
    (
        StatusCode::OK,
        json!({"received": true, "id": id}).to_string(),
    )
}

impl Payments {
    /// `payment.apply_event`.
    pub async fn apply_event(&self, event_id: &str) -> Result<Value, TaskError> {
        let tenants = self.tenants()?;
        let db = tenants.db().conn();
        let seen = db_event(tenants.db(), event_id).await?;
        let Some((kind, payload, processed)) = seen else {
            return Err(TaskError::value_error(format!(
                "event {event_id:?} was never received"
            )));
        };
        let answer = |applied: bool, outcome: &str| json!({"event_id": event_id, "type": kind, "applied": applied, "outcome": outcome});
        if processed {
            return Ok(answer(false, "already processed"));
        }
        let Some(pi) = intent_of(&kind, &payload) else {
            store::mark_foreign_event(db, event_id, "no PaymentIntent").await?;
            return Ok(answer(false, "no PaymentIntent"));
        };
        let owner = store::intent_owner(db, &pi).await?;
        let tenant = match owner {
            Some((id, _)) => Some(tenants.resolve(&id.to_string()).await?),
            None => match payload["data"]["object"]["metadata"]["tenant_id"].as_str() {
                Some(t) => tenants.resolve(t).await.ok(),
                None => None,
            },
        };
        let Some(tenant) = tenant else {
            // The charge that created it may not be recorded yet; give it time, then call it not ours.
            return Err(TaskError::Retry {
                countdown: Some(2.0),
                eta: None,
                exc: None,
                max_retries: Some(5),
            });
        };
        let tx = self.tx(&tenant).await?;
        let outcome = apply(&tx, &tenant, event_id, &kind, &payload, &pi).await?;
        let Some((applied, note)) = outcome else {
            tx.commit().await?;
            return Err(TaskError::Retry {
                countdown: Some(2.0),
                eta: None,
                exc: None,
                max_retries: Some(5),
            });
        };
        store::mark_event(&tx, event_id, &note).await?;
        tx.commit().await?;
        info!(tenant = %tenant.slug, event = %event_id, kind = %kind, applied, "{note}");
        Ok(answer(applied, &note))
    }
}

async fn db_event(db: &Db, id: &str) -> Result<Option<(String, Value, bool)>, TaskError> {
    use sea_orm::{ConnectionTrait, DbBackend, Statement};
    let row = db
        .conn()
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT type, payload, processed_at IS NOT NULL AS done FROM stripe_events WHERE id = $1",
            [id.into()],
        ))
        .await
        .map_err(celeriac_domain::DomainError::from)?;
    Ok(row
        .map(|r| -> Result<_, sea_orm::DbErr> {
            Ok((
                r.try_get("", "type")?,
                r.try_get("", "payload")?,
                r.try_get("", "done")?,
            ))
        })
        .transpose()
        .map_err(celeriac_domain::DomainError::from)?)
}

/// Applies one event under the event's row lock; `None` when its payment is not recorded yet.
async fn apply(
    tx: &TenantTx,
    tenant: &Tenant,
    event_id: &str,
    kind: &str,
    payload: &Value,
    pi: &str,
) -> Result<Option<(bool, String)>, TaskError> {
    let Some((_, _, processed)) = store::load_event(tx, event_id).await? else {
        return Ok(Some((false, "vanished".into())));
    };
    if processed {
        return Ok(Some((false, "already processed".into())));
    }
    let Some(payment) = store::payment_of_intent(tx, pi).await? else {
        return Ok(None);
    };
    let object = &payload["data"]["object"];
    let (status, refunded, disputed, what) = match kind {
        "payment_intent.succeeded" => (Some(PayStatus::Succeeded), None, false, "succeeded"),
        "payment_intent.payment_failed" => {
            (Some(PayStatus::Declined), None, false, "payment failed")
        }
        "payment_intent.processing" => (Some(PayStatus::Processing), None, false, "processing"),
        "payment_intent.requires_action" => (
            Some(PayStatus::RequiresAction),
            None,
            false,
            "requires action",
        ),
        "charge.refunded" => (None, object["amount_refunded"].as_i64(), false, "refunded"),
        "charge.dispute.created" => (None, None, true, "disputed"),
        _ => {
            store::note_event(
                tx,
                event_id,
                kind,
                Some(&payment.order_id),
                Some(pi),
                false,
                "type not handled",
            )
            .await?;
            return Ok(Some((false, "type not handled".into())));
        }
    };
    let moves = status.is_some_and(|s| s.rank() > payment.status.rank())
        || refunded.is_some_and(|r| r > payment.refunded)
        || (disputed && !payment.disputed);
    let note = if moves {
        store::apply_to_payment(tx, &payment, status, refunded, disputed).await?;
        format!(
            "{what}: order {} is now {}",
            payment.order_id,
            status
                .filter(|s| s.rank() > payment.status.rank())
                .unwrap_or(payment.status)
                .as_str()
        )
    } else {
        format!(
            "{what}: nothing to change (order {} is {})",
            payment.order_id,
            payment.status.as_str()
        )
    };
    let _ = tenant;
    store::note_event(
        tx,
        event_id,
        kind,
        Some(&payment.order_id),
        Some(pi),
        moves,
        &note,
    )
    .await?;
    Ok(Some((moves, note)))
}
