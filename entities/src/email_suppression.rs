//! `email_suppressions`: addresses a tenant no longer mails (a permanent SMTP refusal put them here).

use sea_orm::entity::prelude::*;

/// A suppressed address.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "email_suppressions")]
pub struct Model {
    /// Owner.
    #[sea_orm(primary_key, auto_increment = false)]
    pub tenant_id: Uuid,
    /// The address, lower case.
    #[sea_orm(primary_key, auto_increment = false)]
    pub address: String,
    /// Why (the server's answer).
    pub reason: String,
    /// SMTP code.
    pub code: Option<i32>,
    /// When.
    pub created_at: ChronoDateTimeUtc,
}

/// No relations are navigated from here.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
