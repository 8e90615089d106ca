//! The vision family's table, tenant-owned under row-level security: `vision_embeddings`, one unit-length
//! embedding per (tenant, product) for visual search, kept in a PostgreSQL `real[]` (pgvector is not
//! packaged for Debian 12; workers scan each tenant's vectors in memory).

use sea_orm_migration::prelude::*;

/// Creates `vision_embeddings`.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::tenancy::require_postgres(manager)?;
        let mut sql = String::from(
            "CREATE TABLE vision_embeddings (
               tenant_id uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
               product_id text NOT NULL CHECK (length(product_id) BETWEEN 1 AND 256),
               embedding real[] NOT NULL CHECK (cardinality(embedding) BETWEEN 1 AND 4096),
               model text NOT NULL,
               updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
               PRIMARY KEY (tenant_id, product_id)
             );
             CREATE INDEX vision_embeddings_updated ON vision_embeddings (tenant_id, updated_at);",
        );
        sql.push_str(&crate::tenancy::tenant_rls("vision_embeddings"));
        manager.get_connection().execute_unprepared(&sql).await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared("DROP TABLE IF EXISTS vision_embeddings;")
            .await?;
        Ok(())
    }
}
