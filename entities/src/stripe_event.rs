//! `stripe_events`: the webhook inbox (platform-level), one row per Stripe event id, stored once however often
//! Stripe delivers it; `processed_at` is set in the transaction that applies it.

use sea_orm::entity::prelude::*;

/// A received event.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "stripe_events")]
pub struct Model {
    /// `evt_...`.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    /// `payment_intent.succeeded`, ...
    #[sea_orm(column_name = "type")]
    pub kind: String,
    /// The event as received.
    #[sea_orm(column_type = "JsonBinary")]
    pub payload: Json,
    /// The PaymentIntent it concerns.
    pub payment_intent: Option<String>,
    /// Its tenant, once known.
    pub tenant_id: Option<Uuid>,
    /// Received.
    pub received_at: ChronoDateTimeUtc,
    /// Applied (or found not to apply).
    pub processed_at: Option<ChronoDateTimeUtc>,
    /// What applying it did.
    pub outcome: Option<String>,
}

/// No relations are navigated from here.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
