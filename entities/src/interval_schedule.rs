//! `celeriac_interval_schedule`: every `every` `period`s (`days`, `hours`, `minutes`, `seconds`, `microseconds`).

use sea_orm::entity::prelude::*;

/// An interval.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "celeriac_interval_schedule")]
pub struct Model {
    /// Id.
    #[sea_orm(primary_key)]
    pub id: i32,
    /// How many periods.
    pub every: i64,
    /// The unit.
    pub period: String,
}

/// No relations are navigated from here.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
