//! `tenants`: the directory of shops (platform.md §2). Not tenant-owned itself: workers read it to resolve a
//! slug or id; only the owner role adds tenants (`celeriac tenants add`).

use sea_orm_migration::prelude::*;

/// Creates `tenants`.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::tenancy::require_postgres(manager)?;
        manager
            .get_connection()
            .execute_unprepared(
                "CREATE TABLE tenants (
                   id uuid PRIMARY KEY,
                   slug text NOT NULL UNIQUE CHECK (slug ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
                   name text NOT NULL,
                   created_at timestamptz NOT NULL DEFAULT now(),
                   settings jsonb NOT NULL DEFAULT '{}'::jsonb
                 );",
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared("DROP TABLE IF EXISTS tenants;")
            .await?;
        Ok(())
    }
}
