//! The catalog and data-sync tables, all tenant-owned under row-level security: a tenant's source
//! (`sync_sources`, the token sealed), each stream's checkpoint (`sync_state`: resume URL, composite cursor,
//! the running pass, its lease and counts), the synced records (`catalog_products` with
//! `catalog_variants` and `catalog_images`, `sync_orders`, `sync_customers`), image embedding requests
//! (`catalog_embed_requests`) and shop webhooks seen (`sync_webhooks`).

use sea_orm_migration::prelude::*;

/// Creates the catalog and sync tables.
#[derive(DeriveMigrationName)]
pub struct Migration;

const TABLES: [&str; 9] = [
    "sync_sources",
    "sync_state",
    "catalog_products",
    "catalog_variants",
    "catalog_images",
    "catalog_embed_requests",
    "sync_orders",
    "sync_customers",
    "sync_webhooks",
];

#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::tenancy::require_postgres(manager)?;
        let mut sql = String::from(
            "CREATE TABLE sync_sources (
               tenant_id uuid PRIMARY KEY REFERENCES tenants(id) ON DELETE CASCADE,
               kind text NOT NULL CHECK (kind IN ('shopify')),
               url text NOT NULL,
               api_version text NOT NULL,
               token bytea NOT NULL,
               webhook_secret bytea,
               enabled boolean NOT NULL DEFAULT true,
               last_error text,
               updated_at timestamptz NOT NULL DEFAULT now()
             );
             CREATE TABLE sync_state (
               tenant_id uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
               stream text NOT NULL CHECK (stream IN ('products', 'orders', 'customers')),
               cursor_updated_at timestamptz,
               cursor_id bigint,
               pass_id uuid,
               pass_mode text,
               pass_started_at timestamptz,
               resume_url text,
               pass_counts jsonb NOT NULL DEFAULT '{}'::jsonb,
               lease_until timestamptz,
               lease_owner text,
               last_run_at timestamptz,
               last_success_at timestamptz,
               last_counts jsonb,
               last_error text,
               PRIMARY KEY (tenant_id, stream)
             );
             CREATE TABLE catalog_products (
               tenant_id uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
               external_id bigint NOT NULL,
               title text NOT NULL,
               body_html text,
               vendor text,
               product_type text,
               handle text,
               status text,
               tags text,
               src_created_at timestamptz,
               src_updated_at timestamptz NOT NULL,
               content_hash text NOT NULL,
               raw jsonb NOT NULL,
               seen_pass uuid,
               deleted_at timestamptz,
               synced_at timestamptz NOT NULL DEFAULT now(),
               PRIMARY KEY (tenant_id, external_id)
             );
             CREATE INDEX catalog_products_updated ON catalog_products (tenant_id, src_updated_at, external_id);
             CREATE TABLE catalog_variants (
               tenant_id uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
               external_id bigint NOT NULL,
               product_id bigint NOT NULL,
               title text,
               price text,
               sku text,
               position integer,
               inventory_quantity integer,
               raw jsonb NOT NULL,
               PRIMARY KEY (tenant_id, external_id)
             );
             CREATE INDEX catalog_variants_product ON catalog_variants (tenant_id, product_id);
             CREATE TABLE catalog_images (
               tenant_id uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
               external_id bigint NOT NULL,
               product_id bigint NOT NULL,
               src text NOT NULL,
               position integer,
               width integer,
               height integer,
               PRIMARY KEY (tenant_id, external_id)
             );
             CREATE INDEX catalog_images_product ON catalog_images (tenant_id, product_id);
             CREATE TABLE catalog_embed_requests (
               tenant_id uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
               image_id bigint NOT NULL,
               product_id bigint NOT NULL,
               src text NOT NULL,
               content_hash text NOT NULL,
               status text NOT NULL CHECK (status IN ('pending', 'recorded', 'done')),
               requested_at timestamptz NOT NULL DEFAULT now(),
               PRIMARY KEY (tenant_id, image_id, content_hash)
             );
             CREATE TABLE sync_orders (
               tenant_id uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
               external_id bigint NOT NULL,
               name text,
               email text,
               customer_id bigint,
               financial_status text,
               fulfillment_status text,
               currency text,
               total_price text,
               src_created_at timestamptz,
               src_updated_at timestamptz NOT NULL,
               content_hash text NOT NULL,
               raw jsonb NOT NULL,
               seen_pass uuid,
               deleted_at timestamptz,
               synced_at timestamptz NOT NULL DEFAULT now(),
               PRIMARY KEY (tenant_id, external_id)
             );
             CREATE INDEX sync_orders_email ON sync_orders (tenant_id, lower(email));
             CREATE TABLE sync_customers (
               tenant_id uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
               external_id bigint NOT NULL,
               email text,
               first_name text,
               last_name text,
               orders_count integer,
               total_spent text,
               src_created_at timestamptz,
               src_updated_at timestamptz NOT NULL,
               content_hash text NOT NULL,
               raw jsonb NOT NULL,
               seen_pass uuid,
               deleted_at timestamptz,
               synced_at timestamptz NOT NULL DEFAULT now(),
               PRIMARY KEY (tenant_id, external_id)
             );
             CREATE TABLE sync_webhooks (
               tenant_id uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
               webhook_id text NOT NULL,
               topic text NOT NULL,
               received_at timestamptz NOT NULL DEFAULT now(),
               PRIMARY KEY (tenant_id, webhook_id)
             );",
        );
        for table in TABLES {
            sql.push_str(&crate::tenancy::tenant_rls(table));
        }
        manager.get_connection().execute_unprepared(&sql).await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(
                "DROP TABLE IF EXISTS sync_webhooks, sync_customers, sync_orders, catalog_embed_requests, \
                 catalog_images, catalog_variants, catalog_products, sync_state, sync_sources;",
            )
            .await?;
        Ok(())
    }
}
