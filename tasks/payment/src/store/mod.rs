//! The family's database access. Tenant tables through a [`TenantTx`] (`$1` is the tenant): the payment of an
//! order attempt (insert-or-lock, claim, outcome), refunds reserved under the payment's row lock, and the
//! events applied. Platform tables (`stripe_events`, `payment_intent_tenants`) through the pool.

mod events;
mod refunds;

pub use events::{
    apply_to_payment, events_of_order, intent_owner, load_event, mark_event, mark_foreign_event,
    note_event, store_event,
};
pub use refunds::{
    Refund, find_refund, insert_refund, record_refund, refunds_of_order, refunds_total,
};

use celeriac_domain::{DomainError, TenantTx};
use chrono::{DateTime, Utc};
use sea_orm::QueryResult;
use serde_json::Value as Json;
use uuid::Uuid;

/// A payment's status (the column's closed set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayStatus {
    /// Row created, nothing sent yet.
    Claimed,
    /// The key was sent (the charge may exist at Stripe); sending it again is safe for `key_lifetime`.
    Submitted,
    /// Charged.
    Succeeded,
    /// The customer must authenticate.
    RequiresAction,
    /// Stripe is processing it.
    Processing,
    /// The card was declined (final for this attempt).
    Declined,
    /// Refused for good (a bug or a configuration error).
    Failed,
    /// Retries ran out while the charge's fate was unknown: reconciled by the next attempt or an event.
    Unknown,
}

impl PayStatus {
    /// The column value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Claimed => "claimed",
            Self::Submitted => "submitted",
            Self::Succeeded => "succeeded",
            Self::RequiresAction => "requires_action",
            Self::Processing => "processing",
            Self::Declined => "declined",
            Self::Failed => "failed",
            Self::Unknown => "unknown",
        }
    }

    /// Parses the column.
    pub fn parse(s: &str) -> Result<Self, DomainError> {
        Ok(match s {
            "claimed" => Self::Claimed,
            "submitted" => Self::Submitted,
            "succeeded" => Self::Succeeded,
            "requires_action" => Self::RequiresAction,
            "processing" => Self::Processing,
            "declined" => Self::Declined,
            "failed" => Self::Failed,
            "unknown" => Self::Unknown,
            other => {
                return Err(DomainError::Db(sea_orm::DbErr::Type(format!(
                    "payments.status {other:?}"
                ))));
            }
        })
    }

    /// The status a Stripe PaymentIntent status maps to.
    pub fn from_stripe(s: &str) -> Self {
        match s {
            "succeeded" => Self::Succeeded,
            "requires_action" | "requires_confirmation" => Self::RequiresAction,
            "processing" | "requires_capture" => Self::Processing,
            "requires_payment_method" | "canceled" => Self::Declined,
            _ => Self::Unknown,
        }
    }

    /// How far along a charge is: events only ever move a payment forward.
    pub fn rank(self) -> u8 {
        match self {
            Self::Claimed => 0,
            Self::Submitted | Self::Unknown => 1,
            Self::RequiresAction | Self::Processing => 2,
            Self::Declined | Self::Failed => 3,
            Self::Succeeded => 4,
        }
    }
}

/// A payment row.
#[derive(Debug, Clone, PartialEq)]
pub struct Payment {
    /// Row id.
    pub id: Uuid,
    /// Order.
    pub order_id: String,
    /// Attempt.
    pub attempt: i32,
    /// Status.
    pub status: PayStatus,
    /// Minor units.
    pub amount: i64,
    /// Currency.
    pub currency: String,
    /// Payment method.
    pub payment_method: String,
    /// The idempotency key.
    pub key: String,
    /// `pi_...`.
    pub payment_intent: Option<String>,
    /// Claim expiry.
    pub lease_until: Option<DateTime<Utc>>,
    /// First submission.
    pub submitted_at: Option<DateTime<Utc>>,
    /// Calls made.
    pub tries: i32,
    /// Refunded so far.
    pub refunded: i64,
    /// Disputed.
    pub disputed: bool,
    /// Decline code.
    pub decline_code: Option<String>,
    /// Error code.
    pub error_code: Option<String>,
    /// Exception class of a final failure.
    pub error_type: Option<String>,
    /// Last error.
    pub last_error: Option<String>,
    /// Created.
    pub created_at: DateTime<Utc>,
}

const COLUMNS: &str = "id, order_id, attempt, status, amount, currency, payment_method, idempotency_key, payment_intent, \
     lease_until, submitted_at, tries, refunded, disputed, decline_code, error_code, error_type, last_error, created_at";

fn payment(r: &QueryResult) -> Result<Payment, DomainError> {
    Ok(Payment {
        id: r.try_get("", "id")?,
        order_id: r.try_get("", "order_id")?,
        attempt: r.try_get("", "attempt")?,
        status: PayStatus::parse(&r.try_get::<String>("", "status")?)?,
        amount: r.try_get("", "amount")?,
        currency: r.try_get("", "currency")?,
        payment_method: r.try_get("", "payment_method")?,
        key: r.try_get("", "idempotency_key")?,
        payment_intent: r.try_get("", "payment_intent")?,
        lease_until: r.try_get("", "lease_until")?,
        submitted_at: r.try_get("", "submitted_at")?,
        tries: r.try_get("", "tries")?,
        refunded: r.try_get("", "refunded")?,
        disputed: r.try_get("", "disputed")?,
        decline_code: r.try_get("", "decline_code")?,
        error_code: r.try_get("", "error_code")?,
        error_type: r.try_get("", "error_type")?,
        last_error: r.try_get("", "last_error")?,
        created_at: r.try_get("", "created_at")?,
    })
}

/// What a charge asks for.
#[derive(Debug, Clone)]
pub struct NewPayment<'a> {
    /// Order.
    pub order_id: &'a str,
    /// Attempt.
    pub attempt: i32,
    /// Minor units.
    pub amount: i64,
    /// Currency.
    pub currency: &'a str,
    /// Payment method.
    pub payment_method: &'a str,
    /// Customer.
    pub customer: Option<&'a str>,
    /// Description.
    pub description: Option<&'a str>,
    /// Metadata.
    pub metadata: &'a Json,
    /// The idempotency key.
    pub key: &'a str,
    /// Celery task id.
    pub task_id: &'a str,
}

/// Another attempt of the order holds the one live charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveAttempt {
    /// Its attempt number.
    pub attempt: i32,
    /// Its status.
    pub status: String,
}

/// Inserts the attempt's row unless it exists, then locks it; `Err(LiveAttempt)` when another attempt of the
/// order is live (at most one live charge per order).
pub async fn lock_or_insert(
    tx: &TenantTx,
    p: &NewPayment<'_>,
) -> Result<Result<Payment, LiveAttempt>, DomainError> {
    tx.execute(
        "INSERT INTO payments (tenant_id, id, order_id, attempt, status, amount, currency, payment_method, customer, \
         description, metadata, idempotency_key, task_id) \
         VALUES ($1, $2, $3, $4, 'claimed', $5, $6, $7, $8, $9, $10, $11, $12) ON CONFLICT DO NOTHING",
        vec![
            Uuid::new_v4().into(),
            p.order_id.into(),
            p.attempt.into(),
            p.amount.into(),
            p.currency.into(),
            p.payment_method.into(),
            p.customer.map(str::to_string).into(),
            p.description.map(str::to_string).into(),
            p.metadata.clone().into(),
            p.key.into(),
            p.task_id.into(),
        ],
    )
    .await?;
    let mine = tx
        .one(
            &format!("SELECT {COLUMNS} FROM payments WHERE tenant_id = $1 AND order_id = $2 AND attempt = $3 FOR UPDATE"),
            vec![p.order_id.into(), p.attempt.into()],
        )
        .await?;
    match mine {
        Some(r) => Ok(Ok(payment(&r)?)),
        None => {
            let live = tx
                .one(
                    "SELECT attempt, status FROM payments WHERE tenant_id = $1 AND order_id = $2 \
                     AND status IN ('claimed', 'submitted', 'succeeded', 'requires_action', 'processing', 'unknown')",
                    vec![p.order_id.into()],
                )
                .await?
                .ok_or_else(|| DomainError::Db(sea_orm::DbErr::RecordNotFound(format!("payments row of order {:?}", p.order_id))))?;
            Ok(Err(LiveAttempt {
                attempt: live.try_get("", "attempt")?,
                status: live.try_get("", "status")?,
            }))
        }
    }
}

/// Marks the key as sent: `submitted` with a lease, one more try, the first submission time kept.
pub async fn submit(
    tx: &TenantTx,
    id: Uuid,
    lease_until: DateTime<Utc>,
) -> Result<(), DomainError> {
    tx.execute(
        "UPDATE payments SET status = 'submitted', lease_until = $3, tries = tries + 1, \
         submitted_at = COALESCE(submitted_at, now()), updated_at = now() WHERE tenant_id = $1 AND id = $2",
        vec![id.into(), lease_until.into()],
    )
    .await?;
    Ok(())
}

/// An outcome to record.
#[derive(Debug, Clone, Default)]
pub struct Outcome<'a> {
    /// `pi_...`.
    pub payment_intent: Option<&'a str>,
    /// Decline code.
    pub decline_code: Option<&'a str>,
    /// Error code.
    pub error_code: Option<&'a str>,
    /// Exception class.
    pub error_type: Option<&'a str>,
    /// Error text.
    pub error: Option<&'a str>,
}

/// Records a status (and what came with it), releasing the lease.
pub async fn record(
    tx: &TenantTx,
    id: Uuid,
    status: PayStatus,
    o: &Outcome<'_>,
) -> Result<(), DomainError> {
    tx.execute(
        "UPDATE payments SET status = $3, payment_intent = COALESCE($4, payment_intent), decline_code = $5, \
         error_code = $6, error_type = $7, last_error = $8, lease_until = NULL, updated_at = now() \
         WHERE tenant_id = $1 AND id = $2",
        vec![
            id.into(),
            status.as_str().into(),
            o.payment_intent.map(str::to_string).into(),
            o.decline_code.map(str::to_string).into(),
            o.error_code.map(str::to_string).into(),
            o.error_type.map(str::to_string).into(),
            o.error.map(str::to_string).into(),
        ],
    )
    .await?;
    Ok(())
}

/// Routes a PaymentIntent to its tenant and order (for webhook events).
pub async fn register_intent(
    tx: &TenantTx,
    payment_intent: &str,
    order_id: &str,
) -> Result<(), DomainError> {
    tx.execute(
        "INSERT INTO payment_intent_tenants (payment_intent, tenant_id, order_id) VALUES ($2, $1, $3) \
         ON CONFLICT (payment_intent) DO NOTHING",
        vec![payment_intent.into(), order_id.into()],
    )
    .await?;
    Ok(())
}

/// The live payment of an order, locked (refunds serialize on it).
pub async fn live_payment(tx: &TenantTx, order_id: &str) -> Result<Option<Payment>, DomainError> {
    tx.one(
        &format!(
            "SELECT {COLUMNS} FROM payments WHERE tenant_id = $1 AND order_id = $2 \
             AND status IN ('claimed', 'submitted', 'succeeded', 'requires_action', 'processing', 'unknown') FOR UPDATE"
        ),
        vec![order_id.into()],
    )
    .await?
    .as_ref()
    .map(payment)
    .transpose()
}

/// The payment of a PaymentIntent, locked.
pub async fn payment_of_intent(
    tx: &TenantTx,
    payment_intent: &str,
) -> Result<Option<Payment>, DomainError> {
    tx.one(
        &format!(
            "SELECT {COLUMNS} FROM payments WHERE tenant_id = $1 AND payment_intent = $2 FOR UPDATE"
        ),
        vec![payment_intent.into()],
    )
    .await?
    .as_ref()
    .map(payment)
    .transpose()
}

/// Every attempt of an order, oldest first.
pub async fn payments_of_order(tx: &TenantTx, order_id: &str) -> Result<Vec<Payment>, DomainError> {
    tx.all(
        &format!(
            "SELECT {COLUMNS} FROM payments WHERE tenant_id = $1 AND order_id = $2 ORDER BY attempt"
        ),
        vec![order_id.into()],
    )
    .await?
    .iter()
    .map(payment)
    .collect()
}
