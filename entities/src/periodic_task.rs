//! `celeriac_periodic_task`: a scheduled task (django-celery-beat's `PeriodicTask`). Exactly one of the four
//! schedule ids is set. `args`/`kwargs`/`headers` are JSON text, as django-celery-beat stores them.

use sea_orm::entity::prelude::*;

/// A periodic task.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "celeriac_periodic_task")]
pub struct Model {
    /// Id.
    #[sea_orm(primary_key)]
    pub id: i32,
    /// Unique entry name.
    #[sea_orm(unique)]
    pub name: String,
    /// Task name.
    pub task: String,
    /// Interval schedule.
    pub interval_id: Option<i32>,
    /// Crontab schedule.
    pub crontab_id: Option<i32>,
    /// Solar schedule.
    pub solar_id: Option<i32>,
    /// Clocked schedule.
    pub clocked_id: Option<i32>,
    /// Positional arguments, JSON list.
    pub args: String,
    /// Keyword arguments, JSON object.
    pub kwargs: String,
    /// Queue (routing).
    pub queue: Option<String>,
    /// Extra message headers, JSON object.
    pub headers: String,
    /// Message priority.
    pub priority: Option<i32>,
    /// The entry stops being sent after this time.
    pub expires: Option<ChronoDateTimeUtc>,
    /// Each message expires this many seconds after it is sent.
    pub expire_seconds: Option<i32>,
    /// Run once, then disable.
    pub one_off: bool,
    /// Not before this time.
    pub start_time: Option<ChronoDateTimeUtc>,
    /// Paused when false.
    pub enabled: bool,
    /// The last slot sent.
    pub last_run_at: Option<ChronoDateTimeUtc>,
    /// How many slots were sent.
    pub total_run_count: i64,
    /// Last change (beats reload when it moves).
    pub date_changed: ChronoDateTimeUtc,
    /// Free text.
    pub description: String,
}

/// No relations are navigated from here (schedules are loaded by id).
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
