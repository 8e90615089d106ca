//! The task history of `celeriac flower`: `celeriac_flower_task`, indexed for Flower's task list filters
//! (received time, state, name, worker).

use sea_orm_migration::prelude::*;

/// Creates the task history table.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum FlowerTask {
    #[sea_orm(iden = "celeriac_flower_task")]
    Table,
    Uuid,
    Name,
    State,
    Received,
    Sent,
    Started,
    Rejected,
    Succeeded,
    Failed,
    Retried,
    Revoked,
    Args,
    Kwargs,
    Eta,
    Expires,
    Retries,
    Worker,
    Result,
    Exception,
    Timestamp,
    Runtime,
    Traceback,
    Exchange,
    RoutingKey,
    Clock,
    Client,
    RootId,
    ParentId,
    Children,
}

// sea-orm-migration's trait (async_trait) spells `&SchemaManager` without its lifetime; matching it needs this.
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        use FlowerTask as T;
        let text = |c: T| ColumnDef::new(c).text().null().to_owned();
        let time = |c: T| ColumnDef::new(c).double().null().to_owned();
        m.create_table(
            Table::create()
                .table(T::Table)
                .if_not_exists()
                .col(
                    ColumnDef::new(T::Uuid)
                        .string_len(64)
                        .not_null()
                        .primary_key(),
                )
                .col(ColumnDef::new(T::Name).string_len(255).null())
                .col(ColumnDef::new(T::State).string_len(32).not_null())
                .col(time(T::Received))
                .col(time(T::Sent))
                .col(time(T::Started))
                .col(time(T::Rejected))
                .col(time(T::Succeeded))
                .col(time(T::Failed))
                .col(time(T::Retried))
                .col(time(T::Revoked))
                .col(text(T::Args))
                .col(text(T::Kwargs))
                .col(text(T::Eta))
                .col(text(T::Expires))
                .col(ColumnDef::new(T::Retries).big_integer().null())
                .col(ColumnDef::new(T::Worker).string_len(255).null())
                .col(text(T::Result))
                .col(text(T::Exception))
                .col(time(T::Timestamp))
                .col(time(T::Runtime))
                .col(text(T::Traceback))
                .col(text(T::Exchange))
                .col(text(T::RoutingKey))
                .col(ColumnDef::new(T::Clock).big_integer().not_null().default(0))
                .col(text(T::Client))
                .col(text(T::RootId))
                .col(text(T::ParentId))
                .col(ColumnDef::new(T::Children).text().not_null().default("[]"))
                .to_owned(),
        )
        .await?;
        for (name, col) in [
            ("celeriac_flower_task_received", T::Received),
            ("celeriac_flower_task_state", T::State),
            ("celeriac_flower_task_name", T::Name),
            ("celeriac_flower_task_worker", T::Worker),
            ("celeriac_flower_task_timestamp", T::Timestamp),
        ] {
            m.create_index(
                Index::create()
                    .if_not_exists()
                    .name(name)
                    .table(T::Table)
                    .col(col)
                    .to_owned(),
            )
            .await?;
        }
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table(FlowerTask::Table).to_owned())
            .await
    }
}
