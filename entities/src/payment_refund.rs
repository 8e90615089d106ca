//! `payment_refunds`: one row per caller refund id, reserved under a lock on its payment before Stripe is
//! called, so the refunds of a payment never add up to more than was charged.

use sea_orm::entity::prelude::*;

/// A refund.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "payment_refunds")]
pub struct Model {
    /// Owner.
    #[sea_orm(primary_key, auto_increment = false)]
    pub tenant_id: Uuid,
    /// Row id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    /// The payment refunded.
    pub payment_id: Uuid,
    /// Its order.
    pub order_id: String,
    /// The caller's idempotency key.
    pub refund_id: String,
    /// Minor units.
    pub amount: i64,
    /// `submitted`, `succeeded`, `pending`, `failed`.
    pub status: String,
    /// `re_...`.
    pub stripe_refund: Option<String>,
    /// `refund:<tenant>:<refund_id>`.
    pub idempotency_key: String,
    /// Calls made.
    pub tries: i32,
    /// Last error.
    pub last_error: Option<String>,
    /// Created.
    pub created_at: ChronoDateTimeUtc,
    /// Last change.
    pub updated_at: ChronoDateTimeUtc,
}

/// No relations are navigated from here.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
