//! Webhook events: applying one to a payment (forward only), recording it per tenant, and the platform's
//! own tables (`stripe_events`, `payment_intent_tenants`) through the pool.

use super::{PayStatus, Payment};
use celeriac_domain::{DomainError, TenantTx};
use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement, Value};
use serde_json::Value as Json;
use uuid::Uuid;

/// Applies an event's effect on a payment (forward only) and records it for the tenant.
pub async fn apply_to_payment(
    tx: &TenantTx,
    payment: &Payment,
    status: Option<PayStatus>,
    refunded: Option<i64>,
    disputed: bool,
) -> Result<(), DomainError> {
    let status = status
        .filter(|s| s.rank() > payment.status.rank())
        .unwrap_or(payment.status);
    tx.execute(
        "UPDATE payments SET status = $3, refunded = GREATEST(refunded, $4), disputed = disputed OR $5, \
         lease_until = CASE WHEN $3 = status THEN lease_until ELSE NULL END, updated_at = now() \
         WHERE tenant_id = $1 AND id = $2",
        vec![payment.id.into(), status.as_str().into(), refunded.unwrap_or(0).into(), disputed.into()],
    )
    .await?;
    Ok(())
}

/// Records an event as seen by the tenant (applied or not, and why).
pub async fn note_event(
    tx: &TenantTx,
    event_id: &str,
    kind: &str,
    order_id: Option<&str>,
    payment_intent: Option<&str>,
    applied: bool,
    note: &str,
) -> Result<(), DomainError> {
    tx.execute(
        "INSERT INTO payment_events (tenant_id, event_id, type, order_id, payment_intent, applied, note) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (tenant_id, event_id) DO NOTHING",
        vec![
            event_id.into(),
            kind.into(),
            order_id.map(str::to_string).into(),
            payment_intent.map(str::to_string).into(),
            applied.into(),
            note.into(),
        ],
    )
    .await?;
    Ok(())
}

/// The events of an order, oldest first: `(event id, type, applied, note, at)`.
pub async fn events_of_order(tx: &TenantTx, order_id: &str) -> Result<Vec<Json>, DomainError> {
    tx.all(
        "SELECT event_id, type, applied, note, created_at FROM payment_events WHERE tenant_id = $1 AND order_id = $2 \
         ORDER BY created_at, event_id",
        vec![order_id.into()],
    )
    .await?
    .iter()
    .map(|r| {
        Ok(serde_json::json!({
            "event_id": r.try_get::<String>("", "event_id")?,
            "type": r.try_get::<String>("", "type")?,
            "applied": r.try_get::<bool>("", "applied")?,
            "note": r.try_get::<String>("", "note")?,
            "at": r.try_get::<DateTime<Utc>>("", "created_at")?.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        }))
    })
    .collect()
}

/// Stores a webhook event unless its id is known; returns whether it still needs applying.
pub async fn store_event(
    db: &DatabaseConnection,
    id: &str,
    kind: &str,
    payload: &Json,
    payment_intent: Option<&str>,
) -> Result<bool, DomainError> {
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "INSERT INTO stripe_events (id, type, payload, payment_intent) VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING",
        [id.into(), kind.into(), payload.clone().into(), payment_intent.map(str::to_string).into()],
    ))
    .await?;
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT processed_at FROM stripe_events WHERE id = $1",
            [id.into()],
        ))
        .await?;
    Ok(row
        .map(|r| r.try_get::<Option<DateTime<Utc>>>("", "processed_at"))
        .transpose()?
        .flatten()
        .is_none())
}

/// A stored event: `(type, payload, processed)`, locked in `tx`'s transaction.
pub async fn load_event(
    tx: &TenantTx,
    id: &str,
) -> Result<Option<(String, Json, bool)>, DomainError> {
    let row = tx
        .conn()
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT type, payload, processed_at FROM stripe_events WHERE id = $1 FOR UPDATE",
            [id.into()],
        ))
        .await?;
    row.map(|r| {
        Ok((
            r.try_get::<String>("", "type")?,
            r.try_get::<Json>("", "payload")?,
            r.try_get::<Option<DateTime<Utc>>>("", "processed_at")?
                .is_some(),
        ))
    })
    .transpose()
}

/// Marks an event processed, in the transaction that applied it.
pub async fn mark_event(tx: &TenantTx, id: &str, outcome: &str) -> Result<(), DomainError> {
    tx.conn()
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "UPDATE stripe_events SET processed_at = now(), outcome = $2, tenant_id = $3 WHERE id = $1",
            [id.into(), outcome.into(), Value::from(tx.tenant().id)],
        ))
        .await?;
    Ok(())
}

/// The tenant (id) and order of a PaymentIntent.
pub async fn intent_owner(
    db: &DatabaseConnection,
    payment_intent: &str,
) -> Result<Option<(Uuid, String)>, DomainError> {
    db.query_one_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "SELECT tenant_id, order_id FROM payment_intent_tenants WHERE payment_intent = $1",
        [payment_intent.into()],
    ))
    .await?
    .map(|r| Ok((r.try_get("", "tenant_id")?, r.try_get("", "order_id")?)))
    .transpose()
}

/// Marks an event processed that belongs to no tenant of ours.
pub async fn mark_foreign_event(
    db: &DatabaseConnection,
    id: &str,
    outcome: &str,
) -> Result<(), DomainError> {
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "UPDATE stripe_events SET processed_at = now(), outcome = $2 WHERE id = $1 AND processed_at IS NULL",
        [id.into(), outcome.into()],
    ))
    .await?;
    Ok(())
}
