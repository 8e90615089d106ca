//! Celery's `crontab(minute, hour, day_of_week, day_of_month, month_of_year)`: field syntax (`*`, `*/15`,
//! `1,2`, `1-5`, `1-10/2`, day names), every field must match (as in Celery), instants evaluated in the
//! schedule's time zone. Across DST changes a local time that does not exist is skipped and one that occurs
//! twice fires once (at its first occurrence).

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use std::collections::BTreeSet;

/// A parsed crontab.
#[derive(Debug, Clone, PartialEq)]
pub struct Crontab {
    minute: BTreeSet<u32>,
    hour: BTreeSet<u32>,
    day_of_week: BTreeSet<u32>,
    day_of_month: BTreeSet<u32>,
    month_of_year: BTreeSet<u32>,
    tz: Tz,
}

const DAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

fn parse_field(
    spec: &str,
    min: u32,
    max: u32,
    names: bool,
    what: &str,
) -> Result<BTreeSet<u32>, String> {
    let value = |s: &str| -> Result<u32, String> {
        if names
            && let Some(i) = DAYS
                .iter()
                .position(|d| s.to_ascii_lowercase().starts_with(d))
        {
            return Ok(i as u32);
        }
        s.parse::<u32>()
            .map_err(|_| format!("crontab {what}: {s:?} is not a number"))
    };
    let mut out = BTreeSet::new();
    for part in spec.split(',') {
        let part = part.trim();
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (
                r,
                s.parse::<u32>()
                    .map_err(|_| format!("crontab {what}: bad step in {part:?}"))?,
            ),
            None => (part, 1),
        };
        if step == 0 {
            return Err(format!("crontab {what}: step 0 in {part:?}"));
        }
        let (lo, hi) = if range == "*" {
            (min, max)
        } else if let Some((a, b)) = range.split_once('-') {
            (value(a)?, value(b)?)
        } else {
            let v = value(range)?;
            (v, if part.contains('/') { max } else { v })
        };
        if lo < min || hi > max || lo > hi {
            return Err(format!("crontab {what}: {part:?} is outside {min}-{max}"));
        }
        out.extend((lo..=hi).step_by(step as usize));
    }
    Ok(out)
}

impl Crontab {
    /// Parses the five Celery fields (`"*"` for any) in a time zone.
    pub fn new(
        minute: &str,
        hour: &str,
        day_of_week: &str,
        day_of_month: &str,
        month_of_year: &str,
        tz: Tz,
    ) -> Result<Self, String> {
        let mut dow = parse_field(day_of_week, 0, 7, true, "day_of_week")?;
        if dow.remove(&7) {
            dow.insert(0);
        }
        Ok(Self {
            minute: parse_field(minute, 0, 59, false, "minute")?,
            hour: parse_field(hour, 0, 23, false, "hour")?,
            day_of_week: dow,
            day_of_month: parse_field(day_of_month, 1, 31, false, "day_of_month")?,
            month_of_year: parse_field(month_of_year, 1, 12, false, "month_of_year")?,
            tz,
        })
    }

    /// The first instant strictly after `after` that matches.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = after.with_timezone(&self.tz);
        let mut day: NaiveDate = local.date_naive();
        for _ in 0..(366 * 5) {
            if self.month_of_year.contains(&day.month())
                && self.day_of_month.contains(&day.day())
                && self
                    .day_of_week
                    .contains(&day.weekday().num_days_from_sunday())
            {
                for h in &self.hour {
                    for m in &self.minute {
                        let naive = day.and_hms_opt(*h, *m, 0)?;
                        // Gaps (spring forward) have no instant: skipped. Folds fire at the first one.
                        let Some(t) = self.tz.from_local_datetime(&naive).earliest() else {
                            continue;
                        };
                        let t = t.with_timezone(&Utc);
                        if t > after {
                            return Some(t);
                        }
                    }
                }
            }
            day = day.succ_opt()?;
        }
        None
    }
}

/// Truncates to the minute (crontab slots are whole minutes).
pub fn minute_floor(t: DateTime<Utc>) -> DateTime<Utc> {
    t - Duration::seconds(i64::from(t.second())) - Duration::nanoseconds(i64::from(t.nanosecond()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn field_syntax() {
        assert_eq!(
            parse_field("*/15", 0, 59, false, "m").unwrap(),
            BTreeSet::from([0, 15, 30, 45])
        );
        assert_eq!(
            parse_field("1-5,10", 0, 59, false, "m").unwrap(),
            BTreeSet::from([1, 2, 3, 4, 5, 10])
        );
        assert_eq!(
            parse_field("1-10/3", 0, 59, false, "m").unwrap(),
            BTreeSet::from([1, 4, 7, 10])
        );
        assert_eq!(
            parse_field("mon-fri", 0, 7, true, "d").unwrap(),
            BTreeSet::from([1, 2, 3, 4, 5])
        );
        assert!(
            parse_field("61", 0, 59, false, "minute")
                .unwrap_err()
                .contains("outside")
        );
        assert!(
            parse_field("x", 0, 59, false, "minute")
                .unwrap_err()
                .contains("not a number")
        );
    }

    #[test]
    fn every_fifteen_minutes_and_weekdays() {
        let c = Crontab::new("*/15", "*", "*", "*", "*", Tz::UTC).unwrap();
        assert_eq!(
            c.next_after(utc("2026-11-21T04:16:00Z")),
            Some(utc("2026-11-21T04:30:00Z"))
        );
        assert_eq!(
            c.next_after(utc("2026-11-21T04:30:00Z")),
            Some(utc("2026-11-21T04:45:00Z"))
        );
        // 2026-11-21 is a Saturday: the next weekday 09:00 is Monday the 23rd.
        let c = Crontab::new("0", "9", "mon-fri", "*", "*", Tz::UTC).unwrap();
        assert_eq!(
            c.next_after(utc("2026-11-21T10:00:00Z")),
            Some(utc("2026-11-23T09:00:00Z"))
        );
        // Day of month AND day of week (Celery): the 13th that is a Friday.
        let c = Crontab::new("0", "0", "fri", "13", "*", Tz::UTC).unwrap();
        assert_eq!(
            c.next_after(utc("2026-11-21T00:00:00Z")),
            Some(utc("2027-08-13T00:00:00Z"))
        );
    }

    #[test]
    fn dst_spring_forward_skips_the_missing_hour() {
        // Europe/Berlin jumps from 02:00 to 03:00 on 2026-03-29: 02:30 does not exist that day.
        let c = Crontab::new("30", "2", "*", "*", "*", chrono_tz::Europe::Berlin).unwrap();
        let next = c.next_after(utc("2026-03-28T12:00:00Z")).unwrap();
        assert_eq!(next, utc("2026-03-30T00:30:00Z")); // 02:30 CEST on the 30th
        // 01:30 local every day stays at 01:30 local across the change (00:30Z before, 23:30Z after).
        let c = Crontab::new("30", "1", "*", "*", "*", chrono_tz::Europe::Berlin).unwrap();
        assert_eq!(
            c.next_after(utc("2026-03-28T12:00:00Z")),
            Some(utc("2026-03-29T00:30:00Z"))
        );
        assert_eq!(
            c.next_after(utc("2026-03-29T12:00:00Z")),
            Some(utc("2026-03-29T23:30:00Z"))
        );
    }

    #[test]
    fn dst_fall_back_fires_the_repeated_hour_once() {
        // Europe/Berlin repeats 02:00-03:00 on 2026-10-25; 02:30 fires at its first occurrence only.
        let c = Crontab::new("30", "2", "*", "*", "*", chrono_tz::Europe::Berlin).unwrap();
        let first = c.next_after(utc("2026-10-24T12:00:00Z")).unwrap();
        assert_eq!(first, utc("2026-10-25T00:30:00Z")); // 02:30 CEST
        assert_eq!(c.next_after(first), Some(utc("2026-10-26T01:30:00Z"))); // next day 02:30 CET
    }
}
