//! The recommendation family's tables, tenant-owned under row-level security: `recommend_interactions`
//! (views, carts and purchases the storefront records; orders come from `sync_orders`) and
//! `recommend_models` (each tenant's trained transformers, versioned; workers load the newest).

use sea_orm_migration::prelude::*;

/// Creates `recommend_interactions` and `recommend_models`.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::tenancy::require_postgres(manager)?;
        let mut sql = String::from(
            "CREATE TABLE recommend_interactions (
               tenant_id uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
               id bigint GENERATED ALWAYS AS IDENTITY,
               customer_id text NOT NULL CHECK (length(customer_id) BETWEEN 1 AND 256),
               product_id text NOT NULL CHECK (length(product_id) BETWEEN 1 AND 256),
               kind text NOT NULL CHECK (kind IN ('view', 'cart', 'purchase')),
               at timestamptz NOT NULL,
               PRIMARY KEY (tenant_id, id)
             );
             CREATE INDEX recommend_interactions_customer
               ON recommend_interactions (tenant_id, customer_id, at);
             CREATE TABLE recommend_models (
               tenant_id uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
               version integer NOT NULL CHECK (version >= 1),
               weights bytea NOT NULL,
               meta jsonb NOT NULL,
               created_at timestamptz NOT NULL DEFAULT now(),
               PRIMARY KEY (tenant_id, version)
             );",
        );
        for table in ["recommend_interactions", "recommend_models"] {
            sql.push_str(&crate::tenancy::tenant_rls(table));
        }
        manager.get_connection().execute_unprepared(&sql).await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared("DROP TABLE IF EXISTS recommend_models, recommend_interactions;")
            .await?;
        Ok(())
    }
}
