//! Timestamps as Python writes them: `datetime.isoformat()` of aware UTC datetimes (`+00:00`, microseconds
//! only when non-zero), and a parser for the ISO forms Celery clients send (with or without offset).

use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};

/// `datetime.isoformat()` of an aware UTC datetime: `2026-11-21T04:17:15.930178+00:00`, or
/// `2030-01-02T03:04:05+00:00` when the microseconds are zero.
///
/// Written digit by digit (every stored result carries one: chrono's `format` parses its pattern each call).
pub fn isoformat(t: DateTime<Utc>) -> String {
    use chrono::{Datelike, Timelike};
    fn digits(out: &mut String, value: u32, width: u32) {
        for i in (0..width).rev() {
            out.push(char::from(b'0' + ((value / 10u32.pow(i)) % 10) as u8));
        }
    }
    let year = t.year();
    if !(0..=9999).contains(&year) {
        // Outside Python's datetime range; keep chrono's rendering rather than inventing one.
        let micros = t.timestamp_subsec_micros();
        let base = t.format("%Y-%m-%dT%H:%M:%S");
        return if micros == 0 {
            format!("{base}+00:00")
        } else {
            format!("{base}.{micros:06}+00:00")
        };
    }
    let micros = t.timestamp_subsec_micros().min(999_999);
    let mut out = String::with_capacity(32);
    digits(&mut out, year as u32, 4);
    out.push('-');
    digits(&mut out, t.month(), 2);
    out.push('-');
    digits(&mut out, t.day(), 2);
    out.push('T');
    digits(&mut out, t.hour(), 2);
    out.push(':');
    digits(&mut out, t.minute(), 2);
    out.push(':');
    digits(&mut out, t.second().min(59), 2);
    if micros != 0 {
        out.push('.');
        digits(&mut out, micros, 6);
    }
    out.push_str("+00:00");
    out
}

/// Parses an ISO-8601 timestamp as sent in `eta`/`expires`. A value without an offset is taken as UTC
/// (Celery's `enable_utc=True` default, and protocol v1's `utc: true`).
pub fn parse_iso(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    for fmt in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%d %H:%M:%S",
    ] {
        if let Ok(n) = NaiveDateTime::parse_from_str(s, fmt) {
            return Some(n.and_utc());
        }
    }
    // Offsets without a colon ("+0000") as some non-Python clients write them.
    DateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f%z")
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// RFC 3339 with microseconds, for our own records (dead-letter entries).
pub fn rfc3339_micros(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn isoformat_matches_python() {
        let t = Utc.with_ymd_and_hms(2030, 1, 2, 3, 4, 5).unwrap();
        assert_eq!(isoformat(t), "2030-01-02T03:04:05+00:00");
        let t = DateTime::from_timestamp(1795234635, 930_178_000).unwrap();
        assert_eq!(isoformat(t), "2026-11-21T04:17:15.930178+00:00");
        let t = DateTime::from_timestamp(1795234635, 5_000).unwrap();
        assert_eq!(isoformat(t), "2026-11-21T04:17:15.000005+00:00");
        let t = Utc.with_ymd_and_hms(999, 12, 31, 23, 59, 58).unwrap();
        assert_eq!(isoformat(t), "0999-12-31T23:59:58+00:00");
        let t = DateTime::from_timestamp(1795234635, 999_999_999).unwrap();
        assert_eq!(isoformat(t), "2026-11-21T04:17:15.999999+00:00");
    }

    #[test]
    fn parses_client_forms() {
        let want = DateTime::from_timestamp(1795234635, 605_364_000).unwrap();
        assert_eq!(parse_iso("2026-11-21T04:17:15.605364+00:00"), Some(want));
        assert_eq!(parse_iso("2026-11-21T05:17:15.605364+01:00"), Some(want));
        assert_eq!(parse_iso("2026-11-21T04:17:15.605364"), Some(want));
        assert_eq!(parse_iso("2026-11-21T04:17:15.605364Z"), Some(want));
        assert_eq!(parse_iso("yesterday"), None);
    }
}
