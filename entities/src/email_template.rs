//! `email_templates`: a tenant's mail templates, one row per name and locale (minijinja sources).

use sea_orm::entity::prelude::*;

/// A template in one locale.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "email_templates")]
pub struct Model {
    /// Owner.
    #[sea_orm(primary_key, auto_increment = false)]
    pub tenant_id: Uuid,
    /// Template name (`welcome`).
    #[sea_orm(primary_key, auto_increment = false)]
    pub name: String,
    /// Locale (`en`, `de-AT`).
    #[sea_orm(primary_key, auto_increment = false)]
    pub locale: String,
    /// Subject template.
    pub subject: String,
    /// Plain-text body template.
    #[sea_orm(column_type = "Text", nullable)]
    pub text_body: Option<String>,
    /// HTML body template (auto-escaped).
    #[sea_orm(column_type = "Text", nullable)]
    pub html_body: Option<String>,
    /// Last change.
    pub updated_at: ChronoDateTimeUtc,
}

/// No relations are navigated from here.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
