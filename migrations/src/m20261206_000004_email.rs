//! The email family's tables, all tenant-owned with row-level security: `email_templates` (per name and
//! locale), `email_outbox` (one row per idempotency key: the claim, the rendered mail, the outcome),
//! `email_suppressions` (addresses that bounced permanently) and `email_quota` (mails per tenant per day).

use sea_orm_migration::prelude::*;

/// Creates the email tables.
#[derive(DeriveMigrationName)]
pub struct Migration;

const TABLES: [&str; 4] = [
    "email_templates",
    "email_outbox",
    "email_suppressions",
    "email_quota",
];

#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::tenancy::require_postgres(manager)?;
        let mut sql = String::from(
            "CREATE TABLE email_templates (
               tenant_id uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
               name text NOT NULL,
               locale text NOT NULL,
               subject text NOT NULL,
               text_body text,
               html_body text,
               updated_at timestamptz NOT NULL DEFAULT now(),
               PRIMARY KEY (tenant_id, name, locale)
             );
             CREATE TABLE email_outbox (
               tenant_id uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
               id uuid NOT NULL,
               idempotency_key text NOT NULL,
               status text NOT NULL
                 CHECK (status IN ('queued', 'sending', 'sent', 'retry', 'held', 'failed')),
               attempts integer NOT NULL DEFAULT 0,
               lease_until timestamptz,
               last_code integer,
               last_error text,
               error_type text,
               message_id text NOT NULL,
               mail_from text,
               recipients jsonb NOT NULL DEFAULT '{}'::jsonb,
               subject text,
               raw bytea,
               template text,
               locale text,
               campaign_id text,
               task_id text,
               created_at timestamptz NOT NULL DEFAULT now(),
               updated_at timestamptz NOT NULL DEFAULT now(),
               sent_at timestamptz,
               PRIMARY KEY (tenant_id, id),
               UNIQUE (tenant_id, idempotency_key)
             );
             CREATE INDEX email_outbox_pending ON email_outbox (tenant_id, status)
               WHERE status IN ('queued', 'sending', 'retry');
             CREATE INDEX email_outbox_campaign ON email_outbox (tenant_id, campaign_id)
               WHERE campaign_id IS NOT NULL;
             CREATE TABLE email_suppressions (
               tenant_id uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
               address text NOT NULL,
               reason text NOT NULL,
               code integer,
               created_at timestamptz NOT NULL DEFAULT now(),
               PRIMARY KEY (tenant_id, address)
             );
             CREATE TABLE email_quota (
               tenant_id uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
               day date NOT NULL,
               sent integer NOT NULL DEFAULT 0,
               PRIMARY KEY (tenant_id, day)
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
                "DROP TABLE IF EXISTS email_quota, email_suppressions, email_outbox, email_templates;",
            )
            .await?;
        Ok(())
    }
}
