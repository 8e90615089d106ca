//! Exactly-once interactions: `recommend_interactions.event_key`, unique per tenant where present. A
//! recorded interaction carries the storefront's `event_id` or, without one, the Celery task id, so a message
//! redelivered after its row was committed (a worker killed before the ack) or an event sent twice is written
//! once. Rows recorded before this migration have no key.

use sea_orm_migration::prelude::*;

/// Adds `event_key` and its partial unique index.
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
                "ALTER TABLE recommend_interactions
                   ADD COLUMN event_key text CHECK (length(event_key) BETWEEN 1 AND 300);
                 CREATE UNIQUE INDEX recommend_interactions_event
                   ON recommend_interactions (tenant_id, event_key) WHERE event_key IS NOT NULL;",
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(
                "DROP INDEX IF EXISTS recommend_interactions_event;
                 ALTER TABLE recommend_interactions DROP COLUMN IF EXISTS event_key;",
            )
            .await?;
        Ok(())
    }
}
