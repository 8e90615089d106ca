//! sea-orm entities for the schedule database, modelled on django-celery-beat: a periodic task points at one
//! of four schedule tables (interval, crontab, solar, clocked) and carries its arguments, routing options,
//! `enabled`, `one_off`, `start_time`, `expires`, `last_run_at` and `total_run_count`.
//!
//! # Layout
//! - [`periodic_task`], [`interval_schedule`], [`crontab_schedule`], [`solar_schedule`], [`clocked_schedule`].
//! - [`flower_task`]: the task history of `celeriac flower`.

pub mod clocked_schedule;
pub mod crontab_schedule;
pub mod flower_task;
pub mod interval_schedule;
pub mod periodic_task;
pub mod solar_schedule;
