//! sea-orm migrations for the schedule database (the tables of `celeriac-entities`). Run by `celeriac beat`
//! at start-up when its schedule lives in a database.
//!
//! # Layout
//! - [`Migrator`] (beat's schedule tables, `m20261121_000001_schedules`) and [`FlowerMigrator`] (the task
//!   history of `celeriac flower`, `m20261121_000002_flower_tasks`). They keep separate migration tables, so
//!   either can run against a database without knowing the other's migrations.

use sea_orm_migration::prelude::*;

/// Re-exported so users can run [`Migrator`] without depending on sea-orm-migration themselves.
pub use sea_orm_migration::MigratorTrait as MigratorTraitReexport;

mod m20261121_000001_schedules;
mod m20261121_000002_flower_tasks;

/// Every migration, oldest first.
#[derive(Debug)]
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(m20261121_000001_schedules::Migration)]
    }
}

/// The task history tables of `celeriac flower` (migration table `celeriac_flower_migrations`).
#[derive(Debug)]
pub struct FlowerMigrator;

impl MigratorTrait for FlowerMigrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(m20261121_000002_flower_tasks::Migration)]
    }

    fn migration_table_name() -> sea_orm::DynIden {
        "celeriac_flower_migrations".into_iden()
    }
}
