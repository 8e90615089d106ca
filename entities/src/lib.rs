//! sea-orm entities for every table celeriac keeps: the schedule database (modelled on django-celery-beat: a
//! periodic task points at one of four schedule tables and carries its arguments, routing options, `enabled`,
//! `one_off`, `start_time`, `expires`, `last_run_at` and `total_run_count`), the flower-compat task history,
//! and the platform's domain tables (tenants and the task families' tables).
//!
//! # Layout
//! - [`periodic_task`], [`interval_schedule`], [`crontab_schedule`], [`solar_schedule`], [`clocked_schedule`].
//! - [`flower_task`]: the task history of `celeriac flower`.
//! - [`tenant`]: the tenants (shops).
//! - [`email_template`], [`email_outbox`], [`email_suppression`], [`email_quota`]: the email family.
//! - [`payment`], [`payment_refund`], [`stripe_event`]: the payment family.

pub mod clocked_schedule;
pub mod crontab_schedule;
pub mod email_outbox;
pub mod email_quota;
pub mod email_suppression;
pub mod email_template;
pub mod flower_task;
pub mod interval_schedule;
pub mod payment;
pub mod payment_refund;
pub mod periodic_task;
pub mod solar_schedule;
pub mod stripe_event;
pub mod tenant;
