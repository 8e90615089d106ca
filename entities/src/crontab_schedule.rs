//! `celeriac_crontab_schedule`: the five cron fields and the time zone they are evaluated in.

use sea_orm::entity::prelude::*;

/// A crontab.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "celeriac_crontab_schedule")]
pub struct Model {
    /// Id.
    #[sea_orm(primary_key)]
    pub id: i32,
    /// Minutes.
    pub minute: String,
    /// Hours.
    pub hour: String,
    /// Days of week.
    pub day_of_week: String,
    /// Days of month.
    pub day_of_month: String,
    /// Months.
    pub month_of_year: String,
    /// IANA time zone.
    pub timezone: String,
}

/// No relations are navigated from here.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
