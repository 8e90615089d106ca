//! `tenants`: one row per shop (platform.md §2); tasks name a tenant by its id or slug.

use sea_orm::entity::prelude::*;

/// A tenant.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "tenants")]
pub struct Model {
    /// Tenant id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    /// Short unique name (`acme`), usable instead of the id.
    #[sea_orm(unique)]
    pub slug: String,
    /// Display name.
    pub name: String,
    /// When the tenant was added.
    pub created_at: ChronoDateTimeUtc,
    /// Per-tenant settings.
    #[sea_orm(column_type = "JsonBinary")]
    pub settings: Json,
}

/// No relations are navigated from here.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
