//! sea-orm migrations for every table of `celeriac-entities`.
//!
//! # Layout
//! - [`Migrator`] (beat's schedule tables, `m20261121_000001_schedules`; run by `celeriac beat` at start-up
//!   when its schedule lives in a database) and [`FlowerMigrator`] (the task history of `celeriac flower`,
//!   `m20261121_000002_flower_tasks`).
//! - [`DomainMigrator`]: the platform's domain tables (`tenants`, then each task family's tables), applied by
//!   `celeriac migrate` as the owner role; PostgreSQL only. Workers check it is up to date at start.
//! - `tenancy`: the row-level-security SQL every tenant-owned table gets.
//!
//! Each migrator keeps its own migration table, so any of them can run against a database without knowing
//! the others' migrations.

use sea_orm_migration::prelude::*;

/// Whether a migration is applied.
pub use sea_orm_migration::MigrationStatus;
/// Re-exported so users can run [`Migrator`] without depending on sea-orm-migration themselves.
pub use sea_orm_migration::MigratorTrait as MigratorTraitReexport;

mod m20261121_000001_schedules;
mod m20261121_000002_flower_tasks;
mod m20261206_000003_tenants;
mod m20261206_000004_email;
mod m20261206_000005_payment;
mod m20261206_000006_sync;
mod m20261206_000007_vision;
mod m20261206_000008_recommend;
mod m20261207_000009_recommend_events;
pub mod tenancy;

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

/// The platform's domain tables (migration table `celeriac_domain_migrations`): tenants and the task
/// families' tables, every tenant-owned one under row-level security.
#[derive(Debug)]
pub struct DomainMigrator;

impl MigratorTrait for DomainMigrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261206_000003_tenants::Migration),
            Box::new(m20261206_000004_email::Migration),
            Box::new(m20261206_000005_payment::Migration),
            Box::new(m20261206_000006_sync::Migration),
            Box::new(m20261206_000007_vision::Migration),
            Box::new(m20261206_000008_recommend::Migration),
            Box::new(m20261207_000009_recommend_events::Migration),
        ]
    }

    fn migration_table_name() -> sea_orm::DynIden {
        "celeriac_domain_migrations".into_iden()
    }
}
