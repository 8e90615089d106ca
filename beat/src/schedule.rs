//! Schedule kinds and when they are due (spec §8.2): `interval` (every N seconds after the last run),
//! `crontab`, `solar`, and `clocked` (once, at a time). A schedule maps the last run to the next slot; a
//! slot is the instant an entry should have been sent, which is what beats claim so a slot is sent once.

use crate::crontab::Crontab;
use crate::solar::Solar;
use chrono::{DateTime, Duration, Utc};

/// When an entry runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Schedule {
    /// Every `Duration` after the previous run.
    Interval(Duration),
    /// Cron-style.
    Crontab(Crontab),
    /// A solar event.
    Solar(Solar),
    /// Once, at this time.
    Clocked(DateTime<Utc>),
}

impl Schedule {
    /// The first slot strictly after `last` (`None`: never again).
    pub fn next_after(&self, last: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Self::Interval(every) => Some(last + *every),
            Self::Crontab(c) => c.next_after(last),
            Self::Solar(s) => s.next_after(last),
            Self::Clocked(at) => (*at > last).then_some(*at),
        }
    }
}

/// What to do with slots missed while no beat ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CatchUp {
    /// Send once for the missed slots (the latest), then continue (Celery's behaviour).
    #[default]
    Once,
    /// Skip missed slots; continue with the next future one.
    Skip,
}

/// The slot to send now, if any, given the last run and the catch-up policy: the latest slot that is due
/// (with `Once`), or nothing while the next slot is in the future. Also returns the next slot after that.
pub fn due_slot(
    schedule: &Schedule,
    last: DateTime<Utc>,
    now: DateTime<Utc>,
    catch_up: CatchUp,
) -> (Option<DateTime<Utc>>, Option<DateTime<Utc>>) {
    let Some(mut slot) = schedule.next_after(last) else {
        return (None, None);
    };
    if slot > now {
        return (None, Some(slot));
    }
    // Walk to the latest due slot (bounded: an interval of a second over a long outage).
    let mut missed = 0u32;
    while let Some(next) = schedule.next_after(slot) {
        if next > now || missed > 100_000 {
            break;
        }
        slot = next;
        missed += 1;
    }
    let after = schedule.next_after(slot);
    match catch_up {
        CatchUp::Skip if missed > 0 || now - slot > Duration::seconds(60) => (None, after),
        _ => (Some(slot), after),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono_tz::Tz;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn interval_runs_every_period_after_the_last_run() {
        let s = Schedule::Interval(Duration::seconds(30));
        let last = utc("2026-11-21T00:00:00Z");
        assert_eq!(
            due_slot(&s, last, utc("2026-11-21T00:00:20Z"), CatchUp::Once),
            (None, Some(utc("2026-11-21T00:00:30Z")))
        );
        assert_eq!(
            due_slot(&s, last, utc("2026-11-21T00:00:31Z"), CatchUp::Once),
            (
                Some(utc("2026-11-21T00:00:30Z")),
                Some(utc("2026-11-21T00:01:00Z"))
            )
        );
    }

    #[test]
    fn missed_slots_run_once_or_are_skipped() {
        let s = Schedule::Crontab(Crontab::new("0", "*", "*", "*", "*", Tz::UTC).unwrap());
        let last = utc("2026-11-21T00:00:00Z");
        let now = utc("2026-11-21T05:10:00Z"); // five hourly slots missed
        assert_eq!(
            due_slot(&s, last, now, CatchUp::Once),
            (
                Some(utc("2026-11-21T05:00:00Z")),
                Some(utc("2026-11-21T06:00:00Z"))
            )
        );
        assert_eq!(
            due_slot(&s, last, now, CatchUp::Skip),
            (None, Some(utc("2026-11-21T06:00:00Z")))
        );
        // Skip still sends a slot that is due right now.
        assert_eq!(
            due_slot(&s, last, utc("2026-11-21T01:00:02Z"), CatchUp::Skip),
            (
                Some(utc("2026-11-21T01:00:00Z")),
                Some(utc("2026-11-21T02:00:00Z"))
            )
        );
    }

    #[test]
    fn clocked_runs_once() {
        let at = utc("2026-11-21T12:00:00Z");
        let s = Schedule::Clocked(at);
        assert_eq!(
            due_slot(
                &s,
                utc("2026-11-21T00:00:00Z"),
                utc("2026-11-21T12:00:01Z"),
                CatchUp::Once
            )
            .0,
            Some(at)
        );
        assert_eq!(
            due_slot(&s, at, utc("2026-11-22T00:00:00Z"), CatchUp::Once),
            (None, None)
        );
    }
}
