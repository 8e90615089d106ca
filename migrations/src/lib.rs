//! sea-orm migrations for the schedule database (the tables of `celeriac-entities`). Run by `celeriac beat`
//! at start-up when its schedule lives in a database.
//!
//! # Layout
//! - [`Migrator`] and the one migration, `m20261121_000001_schedules`.

use sea_orm_migration::prelude::*;

/// Re-exported so users can run [`Migrator`] without depending on sea-orm-migration themselves.
pub use sea_orm_migration::MigratorTrait as MigratorTraitReexport;

mod m20261121_000001_schedules;

/// Every migration, oldest first.
#[derive(Debug)]
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(m20261121_000001_schedules::Migration)]
    }
}
