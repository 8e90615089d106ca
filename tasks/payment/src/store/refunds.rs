//! Refunds: reserved under the payment's row lock (the sum of live refunds never passes the amount),
//! their outcome, and an order's refunds.

use super::Payment;
use celeriac_domain::{DomainError, TenantTx};
use sea_orm::QueryResult;
use uuid::Uuid;

/// A refund row.
#[derive(Debug, Clone, PartialEq)]
pub struct Refund {
    /// Row id.
    pub id: Uuid,
    /// The order it refunds.
    pub order_id: String,
    /// The caller's id.
    pub refund_id: String,
    /// Minor units.
    pub amount: i64,
    /// `submitted`, `succeeded`, `pending`, `failed`.
    pub status: String,
    /// `re_...`.
    pub stripe_refund: Option<String>,
    /// The idempotency key.
    pub key: String,
    /// Last error.
    pub last_error: Option<String>,
}

fn refund(r: &QueryResult) -> Result<Refund, DomainError> {
    Ok(Refund {
        id: r.try_get("", "id")?,
        order_id: r.try_get("", "order_id")?,
        refund_id: r.try_get("", "refund_id")?,
        amount: r.try_get("", "amount")?,
        status: r.try_get("", "status")?,
        stripe_refund: r.try_get("", "stripe_refund")?,
        key: r.try_get("", "idempotency_key")?,
        last_error: r.try_get("", "last_error")?,
    })
}

const REFUND_COLUMNS: &str =
    "id, order_id, refund_id, amount, status, stripe_refund, idempotency_key, last_error";

/// The refund of a caller id.
pub async fn find_refund(tx: &TenantTx, refund_id: &str) -> Result<Option<Refund>, DomainError> {
    tx.one(
        &format!(
            "SELECT {REFUND_COLUMNS} FROM payment_refunds WHERE tenant_id = $1 AND refund_id = $2"
        ),
        vec![refund_id.into()],
    )
    .await?
    .as_ref()
    .map(refund)
    .transpose()
}

/// Minor units reserved or refunded on a payment (every refund not failed).
pub async fn refunds_total(tx: &TenantTx, payment_id: Uuid) -> Result<i64, DomainError> {
    Ok(tx
        .one(
            "SELECT COALESCE(sum(amount), 0)::bigint AS n FROM payment_refunds \
             WHERE tenant_id = $1 AND payment_id = $2 AND status <> 'failed'",
            vec![payment_id.into()],
        )
        .await?
        .map(|r| r.try_get::<i64>("", "n"))
        .transpose()?
        .unwrap_or(0))
}

/// Reserves a refund (`submitted`) on a payment; `None` when another transaction took the refund id first.
pub async fn insert_refund(
    tx: &TenantTx,
    payment: &Payment,
    refund_id: &str,
    amount: i64,
    key: &str,
) -> Result<Option<Refund>, DomainError> {
    let id = Uuid::new_v4();
    let n = tx.execute(
        "INSERT INTO payment_refunds (tenant_id, id, payment_id, order_id, refund_id, amount, status, idempotency_key) \
         VALUES ($1, $2, $3, $4, $5, $6, 'submitted', $7) ON CONFLICT (tenant_id, refund_id) DO NOTHING",
        vec![id.into(), payment.id.into(), payment.order_id.clone().into(), refund_id.into(), amount.into(), key.into()],
    )
    .await?;
    if n == 0 {
        return Ok(None);
    }
    Ok(Some(Refund {
        id,
        order_id: payment.order_id.clone(),
        refund_id: refund_id.into(),
        amount,
        status: "submitted".into(),
        stripe_refund: None,
        key: key.into(),
        last_error: None,
    }))
}

/// Records a refund's outcome; a succeeded or pending one also raises the payment's refunded total.
pub async fn record_refund(
    tx: &TenantTx,
    r: &Refund,
    payment_id: Uuid,
    status: &str,
    stripe_refund: Option<&str>,
    error: Option<&str>,
) -> Result<(), DomainError> {
    tx.execute(
        "UPDATE payment_refunds SET status = $3, stripe_refund = COALESCE($4, stripe_refund), last_error = $5, \
         tries = tries + 1, updated_at = now() WHERE tenant_id = $1 AND id = $2",
        vec![r.id.into(), status.into(), stripe_refund.map(str::to_string).into(), error.map(str::to_string).into()],
    )
    .await?;
    tx.execute(
        "UPDATE payments SET refunded = GREATEST(refunded, (SELECT COALESCE(sum(amount), 0) FROM payment_refunds \
         WHERE tenant_id = $1 AND payment_id = $2 AND status IN ('succeeded', 'pending'))), updated_at = now() \
         WHERE tenant_id = $1 AND id = $2",
        vec![payment_id.into()],
    )
    .await?;
    Ok(())
}

/// Every refund of an order.
pub async fn refunds_of_order(tx: &TenantTx, order_id: &str) -> Result<Vec<Refund>, DomainError> {
    tx.all(
        &format!("SELECT {REFUND_COLUMNS} FROM payment_refunds WHERE tenant_id = $1 AND order_id = $2 ORDER BY created_at"),
        vec![order_id.into()],
    )
    .await?
    .iter()
    .map(refund)
    .collect()
}
