//! The payment family's tables. Tenant-owned, under row-level security: `payments` (one row per order and
//! attempt, at most one live charge per order), `payment_refunds` (one row per caller refund id) and
//! `payment_events` (the webhook events applied to a tenant's payments). Platform-level, without a tenant:
//! `stripe_events` (the webhook inbox, one row per Stripe event id) and `payment_intent_tenants` (which tenant
//! and order a PaymentIntent belongs to, so an event can be routed to its tenant).

use sea_orm_migration::prelude::*;

/// Creates the payment tables.
#[derive(DeriveMigrationName)]
pub struct Migration;

const TENANT_TABLES: [&str; 3] = ["payments", "payment_refunds", "payment_events"];

#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::tenancy::require_postgres(manager)?;
        let mut sql = String::from(
            "CREATE TABLE payments (
               tenant_id uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
               id uuid NOT NULL,
               order_id text NOT NULL,
               attempt integer NOT NULL CHECK (attempt >= 1),
               status text NOT NULL CHECK (status IN ('claimed', 'submitted', 'succeeded', 'requires_action',
                 'processing', 'declined', 'failed', 'unknown')),
               amount bigint NOT NULL CHECK (amount > 0),
               currency text NOT NULL,
               payment_method text NOT NULL,
               customer text,
               description text,
               metadata jsonb NOT NULL DEFAULT '{}'::jsonb,
               idempotency_key text NOT NULL,
               payment_intent text,
               lease_until timestamptz,
               submitted_at timestamptz,
               tries integer NOT NULL DEFAULT 0,
               refunded bigint NOT NULL DEFAULT 0,
               disputed boolean NOT NULL DEFAULT false,
               decline_code text,
               error_code text,
               error_type text,
               last_error text,
               task_id text,
               created_at timestamptz NOT NULL DEFAULT now(),
               updated_at timestamptz NOT NULL DEFAULT now(),
               PRIMARY KEY (tenant_id, id),
               UNIQUE (tenant_id, order_id, attempt)
             );
             CREATE UNIQUE INDEX payments_one_live_per_order ON payments (tenant_id, order_id)
               WHERE status IN ('claimed', 'submitted', 'succeeded', 'requires_action', 'processing', 'unknown');
             CREATE TABLE payment_refunds (
               tenant_id uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
               id uuid NOT NULL,
               payment_id uuid NOT NULL,
               order_id text NOT NULL,
               refund_id text NOT NULL,
               amount bigint NOT NULL CHECK (amount > 0),
               status text NOT NULL CHECK (status IN ('submitted', 'succeeded', 'pending', 'failed')),
               stripe_refund text,
               idempotency_key text NOT NULL,
               tries integer NOT NULL DEFAULT 0,
               last_error text,
               created_at timestamptz NOT NULL DEFAULT now(),
               updated_at timestamptz NOT NULL DEFAULT now(),
               PRIMARY KEY (tenant_id, id),
               UNIQUE (tenant_id, refund_id),
               FOREIGN KEY (tenant_id, payment_id) REFERENCES payments (tenant_id, id)
             );
             CREATE TABLE payment_events (
               tenant_id uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
               event_id text NOT NULL,
               type text NOT NULL,
               order_id text,
               payment_intent text,
               applied boolean NOT NULL,
               note text,
               created_at timestamptz NOT NULL DEFAULT now(),
               PRIMARY KEY (tenant_id, event_id)
             );
             CREATE TABLE stripe_events (
               id text PRIMARY KEY,
               type text NOT NULL,
               payload jsonb NOT NULL,
               payment_intent text,
               tenant_id uuid REFERENCES tenants(id) ON DELETE CASCADE,
               received_at timestamptz NOT NULL DEFAULT now(),
               processed_at timestamptz,
               outcome text
             );
             CREATE TABLE payment_intent_tenants (
               payment_intent text PRIMARY KEY,
               tenant_id uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
               order_id text NOT NULL
             );",
        );
        for table in TENANT_TABLES {
            sql.push_str(&crate::tenancy::tenant_rls(table));
        }
        manager.get_connection().execute_unprepared(&sql).await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(
                "DROP TABLE IF EXISTS payment_intent_tenants, stripe_events, payment_events, payment_refunds, payments;",
            )
            .await?;
        Ok(())
    }
}
