//! The schedule tables: interval, crontab, solar, clocked, and periodic tasks that point at one of them.

use sea_orm_migration::prelude::*;

/// Creates the schedule tables.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum IntervalSchedule {
    #[sea_orm(iden = "celeriac_interval_schedule")]
    Table,
    Id,
    Every,
    Period,
}

#[derive(DeriveIden)]
enum CrontabSchedule {
    #[sea_orm(iden = "celeriac_crontab_schedule")]
    Table,
    Id,
    Minute,
    Hour,
    DayOfWeek,
    DayOfMonth,
    MonthOfYear,
    Timezone,
}

#[derive(DeriveIden)]
enum SolarSchedule {
    #[sea_orm(iden = "celeriac_solar_schedule")]
    Table,
    Id,
    Event,
    Latitude,
    Longitude,
}

#[derive(DeriveIden)]
enum ClockedSchedule {
    #[sea_orm(iden = "celeriac_clocked_schedule")]
    Table,
    Id,
    ClockedTime,
}

#[derive(DeriveIden)]
enum PeriodicTask {
    #[sea_orm(iden = "celeriac_periodic_task")]
    Table,
    Id,
    Name,
    Task,
    IntervalId,
    CrontabId,
    SolarId,
    ClockedId,
    Args,
    Kwargs,
    Queue,
    Headers,
    Priority,
    Expires,
    ExpireSeconds,
    OneOff,
    StartTime,
    Enabled,
    LastRunAt,
    TotalRunCount,
    DateChanged,
    Description,
}

fn id<T: IntoIden>(col: T) -> ColumnDef {
    ColumnDef::new(col)
        .integer()
        .not_null()
        .auto_increment()
        .primary_key()
        .to_owned()
}

// sea-orm-migration's trait (async_trait) spells `&SchemaManager` without its lifetime; matching it needs this.
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(IntervalSchedule::Table)
                .if_not_exists()
                .col(id(IntervalSchedule::Id))
                .col(
                    ColumnDef::new(IntervalSchedule::Every)
                        .big_integer()
                        .not_null(),
                )
                .col(
                    ColumnDef::new(IntervalSchedule::Period)
                        .string_len(24)
                        .not_null(),
                )
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(CrontabSchedule::Table)
                .if_not_exists()
                .col(id(CrontabSchedule::Id))
                .col(
                    ColumnDef::new(CrontabSchedule::Minute)
                        .string_len(240)
                        .not_null()
                        .default("*"),
                )
                .col(
                    ColumnDef::new(CrontabSchedule::Hour)
                        .string_len(96)
                        .not_null()
                        .default("*"),
                )
                .col(
                    ColumnDef::new(CrontabSchedule::DayOfWeek)
                        .string_len(64)
                        .not_null()
                        .default("*"),
                )
                .col(
                    ColumnDef::new(CrontabSchedule::DayOfMonth)
                        .string_len(124)
                        .not_null()
                        .default("*"),
                )
                .col(
                    ColumnDef::new(CrontabSchedule::MonthOfYear)
                        .string_len(64)
                        .not_null()
                        .default("*"),
                )
                .col(
                    ColumnDef::new(CrontabSchedule::Timezone)
                        .string_len(63)
                        .not_null()
                        .default("UTC"),
                )
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(SolarSchedule::Table)
                .if_not_exists()
                .col(id(SolarSchedule::Id))
                .col(
                    ColumnDef::new(SolarSchedule::Event)
                        .string_len(24)
                        .not_null(),
                )
                .col(ColumnDef::new(SolarSchedule::Latitude).double().not_null())
                .col(ColumnDef::new(SolarSchedule::Longitude).double().not_null())
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(ClockedSchedule::Table)
                .if_not_exists()
                .col(id(ClockedSchedule::Id))
                .col(
                    ColumnDef::new(ClockedSchedule::ClockedTime)
                        .timestamp_with_time_zone()
                        .not_null(),
                )
                .to_owned(),
        )
        .await?;
        let fk = |name: &str, col: PeriodicTask, table: DynIden| {
            ForeignKey::create()
                .name(name)
                .from(PeriodicTask::Table, col)
                .to(table, Alias::new("id"))
                .on_delete(ForeignKeyAction::Cascade)
                .to_owned()
        };
        m.create_table(
            Table::create()
                .table(PeriodicTask::Table)
                .if_not_exists()
                .col(id(PeriodicTask::Id))
                .col(
                    ColumnDef::new(PeriodicTask::Name)
                        .string_len(200)
                        .not_null()
                        .unique_key(),
                )
                .col(
                    ColumnDef::new(PeriodicTask::Task)
                        .string_len(200)
                        .not_null(),
                )
                .col(ColumnDef::new(PeriodicTask::IntervalId).integer().null())
                .col(ColumnDef::new(PeriodicTask::CrontabId).integer().null())
                .col(ColumnDef::new(PeriodicTask::SolarId).integer().null())
                .col(ColumnDef::new(PeriodicTask::ClockedId).integer().null())
                .col(
                    ColumnDef::new(PeriodicTask::Args)
                        .text()
                        .not_null()
                        .default("[]"),
                )
                .col(
                    ColumnDef::new(PeriodicTask::Kwargs)
                        .text()
                        .not_null()
                        .default("{}"),
                )
                .col(ColumnDef::new(PeriodicTask::Queue).string_len(200).null())
                .col(
                    ColumnDef::new(PeriodicTask::Headers)
                        .text()
                        .not_null()
                        .default("{}"),
                )
                .col(ColumnDef::new(PeriodicTask::Priority).integer().null())
                .col(
                    ColumnDef::new(PeriodicTask::Expires)
                        .timestamp_with_time_zone()
                        .null(),
                )
                .col(ColumnDef::new(PeriodicTask::ExpireSeconds).integer().null())
                .col(
                    ColumnDef::new(PeriodicTask::OneOff)
                        .boolean()
                        .not_null()
                        .default(false),
                )
                .col(
                    ColumnDef::new(PeriodicTask::StartTime)
                        .timestamp_with_time_zone()
                        .null(),
                )
                .col(
                    ColumnDef::new(PeriodicTask::Enabled)
                        .boolean()
                        .not_null()
                        .default(true),
                )
                .col(
                    ColumnDef::new(PeriodicTask::LastRunAt)
                        .timestamp_with_time_zone()
                        .null(),
                )
                .col(
                    ColumnDef::new(PeriodicTask::TotalRunCount)
                        .big_integer()
                        .not_null()
                        .default(0),
                )
                .col(
                    ColumnDef::new(PeriodicTask::DateChanged)
                        .timestamp_with_time_zone()
                        .not_null()
                        .default(Expr::current_timestamp()),
                )
                .col(
                    ColumnDef::new(PeriodicTask::Description)
                        .text()
                        .not_null()
                        .default(""),
                )
                .foreign_key(&mut fk(
                    "fk_periodic_task_interval",
                    PeriodicTask::IntervalId,
                    IntervalSchedule::Table.into_iden(),
                ))
                .foreign_key(&mut fk(
                    "fk_periodic_task_crontab",
                    PeriodicTask::CrontabId,
                    CrontabSchedule::Table.into_iden(),
                ))
                .foreign_key(&mut fk(
                    "fk_periodic_task_solar",
                    PeriodicTask::SolarId,
                    SolarSchedule::Table.into_iden(),
                ))
                .foreign_key(&mut fk(
                    "fk_periodic_task_clocked",
                    PeriodicTask::ClockedId,
                    ClockedSchedule::Table.into_iden(),
                ))
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table(PeriodicTask::Table).to_owned())
            .await?;
        m.drop_table(Table::drop().table(ClockedSchedule::Table).to_owned())
            .await?;
        m.drop_table(Table::drop().table(SolarSchedule::Table).to_owned())
            .await?;
        m.drop_table(Table::drop().table(CrontabSchedule::Table).to_owned())
            .await?;
        m.drop_table(Table::drop().table(IntervalSchedule::Table).to_owned())
            .await
    }
}
