//! The schedule file (`celeriac beat --schedule beat.toml`), with Celery's `beat_schedule` shape:
//!
//! ```toml
//! timezone = "Europe/Berlin"   # crontab evaluation (Celery's `timezone`), default UTC
//! catch_up = "once"            # slots missed while no beat ran: "once" (Celery) or "skip"
//!
//! [beat_schedule.refresh-catalog]
//! task = "catalog.refresh"
//! crontab = { minute = "*/15" }                 # or: schedule = 30.0 (seconds)
//! args = [1, 2]                                 # or: solar = { event = "sunrise", lat = 52.5, lon = 13.4 }
//! options = { queue = "bulk", priority = 5, expires = 600, headers = { source = "beat" } }
//! ```
//! `clocked = "2026-12-01T09:00:00+00:00"` runs once. `enabled = false` pauses an entry.

use crate::crontab::Crontab;
use crate::schedule::{CatchUp, Schedule};
use crate::solar::Solar;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleFile {
    /// Time zone for crontabs.
    #[serde(default = "utc")]
    pub timezone: String,
    /// `"once"` or `"skip"`.
    #[serde(default = "once")]
    pub catch_up: String,
    /// Entries by name.
    #[serde(default)]
    pub beat_schedule: BTreeMap<String, EntrySpec>,
}

fn utc() -> String {
    "UTC".into()
}

fn once() -> String {
    "once".into()
}

/// One entry as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntrySpec {
    /// Task name.
    pub task: String,
    /// Interval in seconds.
    pub schedule: Option<f64>,
    /// Cron fields (missing ones are `*`).
    pub crontab: Option<CrontabSpec>,
    /// Solar event.
    pub solar: Option<SolarSpec>,
    /// One-off time (ISO-8601).
    pub clocked: Option<String>,
    /// Positional arguments.
    #[serde(default)]
    pub args: Vec<Value>,
    /// Keyword arguments.
    #[serde(default)]
    pub kwargs: Map<String, Value>,
    /// Publishing options (`queue`, `priority`, `expires`, `headers`, ...).
    #[serde(default)]
    pub options: Map<String, Value>,
    /// Paused when false.
    #[serde(default = "yes")]
    pub enabled: bool,
}

fn yes() -> bool {
    true
}

fn star() -> String {
    "*".into()
}

/// Cron fields.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CrontabSpec {
    /// Minutes.
    #[serde(default = "star")]
    pub minute: String,
    /// Hours.
    #[serde(default = "star")]
    pub hour: String,
    /// Days of week (0 or 7 = Sunday, names allowed).
    #[serde(default = "star")]
    pub day_of_week: String,
    /// Days of month.
    #[serde(default = "star")]
    pub day_of_month: String,
    /// Months.
    #[serde(default = "star")]
    pub month_of_year: String,
}

/// A solar event.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SolarSpec {
    /// `sunrise`, `sunset`, `dawn_civil`, ...
    pub event: String,
    /// Latitude.
    pub lat: f64,
    /// Longitude.
    pub lon: f64,
}

/// A validated entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Name (unique key).
    pub name: String,
    /// Task name.
    pub task: String,
    /// When.
    pub schedule: Schedule,
    /// Positional arguments.
    pub args: Vec<Value>,
    /// Keyword arguments.
    pub kwargs: Map<String, Value>,
    /// Publishing options.
    pub options: Map<String, Value>,
    /// Run once, then disable (database entries).
    pub one_off: bool,
    /// Not before this time.
    pub start_time: Option<chrono::DateTime<chrono::Utc>>,
    /// Not after this time.
    pub expires: Option<chrono::DateTime<chrono::Utc>>,
}

/// A validated schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    /// Enabled entries.
    pub entries: Vec<Entry>,
    /// Catch-up policy.
    pub catch_up: CatchUp,
}

impl ScheduleFile {
    /// Parses and validates; errors name the entry and field.
    pub fn parse(text: &str) -> Result<Loaded, String> {
        let file: ScheduleFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let tz: chrono_tz::Tz = file
            .timezone
            .parse()
            .map_err(|_| format!("timezone: unknown time zone {:?}", file.timezone))?;
        let catch_up = match file.catch_up.as_str() {
            "once" => CatchUp::Once,
            "skip" => CatchUp::Skip,
            other => {
                return Err(format!(
                    "catch_up: unknown policy {other:?} (expected \"once\" or \"skip\")"
                ));
            }
        };
        let mut entries = Vec::new();
        for (name, e) in file.beat_schedule {
            let err = |m: String| format!("beat_schedule.{name}: {m}");
            let kinds = [
                e.schedule.is_some(),
                e.crontab.is_some(),
                e.solar.is_some(),
                e.clocked.is_some(),
            ];
            if kinds.iter().filter(|k| **k).count() != 1 {
                return Err(err(
                    "give exactly one of schedule, crontab, solar, clocked".into()
                ));
            }
            let schedule = if let Some(secs) = e.schedule {
                if !(secs > 0.0 && secs.is_finite()) {
                    return Err(err(format!(
                        "schedule must be a positive number of seconds, got {secs}"
                    )));
                }
                Schedule::Interval(chrono::Duration::milliseconds((secs * 1000.0) as i64))
            } else if let Some(c) = &e.crontab {
                Schedule::Crontab(
                    Crontab::new(
                        &c.minute,
                        &c.hour,
                        &c.day_of_week,
                        &c.day_of_month,
                        &c.month_of_year,
                        tz,
                    )
                    .map_err(err)?,
                )
            } else if let Some(s) = &e.solar {
                Schedule::Solar(Solar::new(&s.event, s.lat, s.lon).map_err(err)?)
            } else {
                let at = e.clocked.as_deref().unwrap_or_default();
                Schedule::Clocked(
                    celeriac_protocol::time::parse_iso(at)
                        .ok_or_else(|| err(format!("clocked: {at:?} is not an ISO-8601 time")))?,
                )
            };
            if e.enabled {
                entries.push(Entry {
                    name,
                    task: e.task,
                    schedule,
                    args: e.args,
                    kwargs: e.kwargs,
                    options: e.options,
                    one_off: false,
                    start_time: None,
                    expires: None,
                });
            }
        }
        Ok(Loaded { entries, catch_up })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_kind() {
        let l = ScheduleFile::parse(
            r#"
timezone = "Europe/Berlin"
catch_up = "skip"
[beat_schedule.a]
task = "bench.add"
schedule = 30
args = [1, 2]
options = { queue = "bulk", priority = 5 }
[beat_schedule.b]
task = "bench.noop"
crontab = { minute = "*/15", hour = "9-17", day_of_week = "mon-fri" }
[beat_schedule.c]
task = "bench.noop"
solar = { event = "sunset", lat = 52.5, lon = 13.4 }
[beat_schedule.d]
task = "bench.noop"
clocked = "2026-12-01T09:00:00+00:00"
[beat_schedule.e]
task = "bench.noop"
schedule = 5
enabled = false
"#,
        )
        .unwrap();
        assert_eq!(l.catch_up, CatchUp::Skip);
        let names: Vec<_> = l.entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c", "d"]);
        assert_eq!(
            l.entries[0].schedule,
            Schedule::Interval(chrono::Duration::seconds(30))
        );
    }

    #[test]
    fn errors_name_the_entry() {
        let e = ScheduleFile::parse("[beat_schedule.x]\ntask = \"t\"\n").unwrap_err();
        assert!(e.contains("beat_schedule.x: give exactly one"), "{e}");
        let e =
            ScheduleFile::parse("[beat_schedule.x]\ntask = \"t\"\ncrontab = { minute = \"99\" }\n")
                .unwrap_err();
        assert!(e.contains("beat_schedule.x: crontab minute"), "{e}");
        let e = ScheduleFile::parse("timezone = \"Mars/Olympus\"\n").unwrap_err();
        assert!(e.contains("timezone"), "{e}");
        let e = ScheduleFile::parse("[beat_schedule.x]\ntask = \"t\"\nschedule = 1\nevery = 2\n")
            .unwrap_err();
        assert!(e.contains("unknown field `every`"), "{e}");
    }
}
