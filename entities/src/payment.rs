//! `payments`: one row per (tenant, order, attempt); claimed before Stripe is called and carrying the
//! idempotency key sent on every try, so a redelivered charge replays its outcome instead of charging again.

use sea_orm::entity::prelude::*;

/// A charge attempt of an order.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "payments")]
pub struct Model {
    /// Owner.
    #[sea_orm(primary_key, auto_increment = false)]
    pub tenant_id: Uuid,
    /// Row id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    /// The shop's order id.
    pub order_id: String,
    /// Attempt number (1, then the next after a final decline).
    pub attempt: i32,
    /// `claimed`, `submitted`, `succeeded`, `requires_action`, `processing`, `declined`, `failed`, `unknown`.
    pub status: String,
    /// Minor units.
    pub amount: i64,
    /// ISO 4217, lower case.
    pub currency: String,
    /// Stripe payment method id.
    pub payment_method: String,
    /// Stripe customer id.
    pub customer: Option<String>,
    /// Description sent to Stripe.
    pub description: Option<String>,
    /// The caller's metadata.
    #[sea_orm(column_type = "JsonBinary")]
    pub metadata: Json,
    /// `charge:<tenant>:<order_id>:<attempt>`.
    pub idempotency_key: String,
    /// `pi_...` once known.
    pub payment_intent: Option<String>,
    /// Claim expiry.
    pub lease_until: Option<ChronoDateTimeUtc>,
    /// First time the key was sent to Stripe.
    pub submitted_at: Option<ChronoDateTimeUtc>,
    /// Calls made with the key.
    pub tries: i32,
    /// Minor units refunded (from refunds and `charge.refunded`).
    pub refunded: i64,
    /// A dispute was opened.
    pub disputed: bool,
    /// Stripe's decline code of a declined card.
    pub decline_code: Option<String>,
    /// Stripe's error code.
    pub error_code: Option<String>,
    /// Exception class of a final failure.
    pub error_type: Option<String>,
    /// Last error text.
    pub last_error: Option<String>,
    /// Celery task id of the first attempt.
    pub task_id: Option<String>,
    /// Created.
    pub created_at: ChronoDateTimeUtc,
    /// Last change.
    pub updated_at: ChronoDateTimeUtc,
}

/// No relations are navigated from here.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
