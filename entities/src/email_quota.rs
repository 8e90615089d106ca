//! `email_quota`: mails claimed per tenant per UTC day, against `email.daily_quota`.

use sea_orm::entity::prelude::*;

/// One tenant-day.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "email_quota")]
pub struct Model {
    /// Owner.
    #[sea_orm(primary_key, auto_increment = false)]
    pub tenant_id: Uuid,
    /// UTC day.
    #[sea_orm(primary_key, auto_increment = false)]
    pub day: ChronoDate,
    /// Mails counted that day.
    pub sent: i32,
}

/// No relations are navigated from here.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
