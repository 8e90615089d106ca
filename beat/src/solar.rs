//! Celery's `solar(event, lat, lon)`: sunrise, sunset, dawn/dusk (civil −6°, nautical −12°, astronomical −18°)
//! and solar noon, computed with the NOAA sunrise equation (within a minute or so of `ephem`, which Celery
//! uses). Events that do not happen on a day (polar day or night) are skipped.

use chrono::{DateTime, Duration, NaiveTime, Utc};

/// A solar event at a place.
#[derive(Debug, Clone, PartialEq)]
pub struct Solar {
    event: Event,
    lat: f64,
    lon: f64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Event {
    Rise(f64),
    Set(f64),
    Noon,
}

impl Solar {
    /// `event` is one of Celery's names: `sunrise`, `sunset`, `dawn_civil`, `dawn_nautical`,
    /// `dawn_astronomical`, `dusk_civil`, `dusk_nautical`, `dusk_astronomical`, `solar_noon`.
    pub fn new(event: &str, lat: f64, lon: f64) -> Result<Self, String> {
        let event = match event {
            "sunrise" => Event::Rise(-0.833),
            "sunset" => Event::Set(-0.833),
            "dawn_civil" => Event::Rise(-6.0),
            "dawn_nautical" => Event::Rise(-12.0),
            "dawn_astronomical" => Event::Rise(-18.0),
            "dusk_civil" => Event::Set(-6.0),
            "dusk_nautical" => Event::Set(-12.0),
            "dusk_astronomical" => Event::Set(-18.0),
            "solar_noon" => Event::Noon,
            other => return Err(format!("solar: unknown event {other:?}")),
        };
        if !(-90.0..=90.0).contains(&lat) || !(-180.0..=180.0).contains(&lon) {
            return Err(format!(
                "solar: latitude {lat} / longitude {lon} out of range"
            ));
        }
        Ok(Self { event, lat, lon })
    }

    /// The event on the UTC day of `day`, if it happens.
    fn on(&self, day: chrono::NaiveDate) -> Option<DateTime<Utc>> {
        let noon = day.and_time(NaiveTime::from_hms_opt(12, 0, 0)?).and_utc();
        let julian = noon.timestamp() as f64 / 86400.0 + 2440587.5;
        let n = (julian - 2451545.0 + 0.0008).round();
        let j_star = n - self.lon / 360.0;
        let m = (357.5291 + 0.98560028 * j_star)
            .rem_euclid(360.0)
            .to_radians();
        let c = 1.9148 * m.sin() + 0.0200 * (2.0 * m).sin() + 0.0003 * (3.0 * m).sin();
        let lambda = (m.to_degrees() + c + 180.0 + 102.9372)
            .rem_euclid(360.0)
            .to_radians();
        let transit = 2451545.0 + j_star + 0.0053 * m.sin() - 0.0069 * (2.0 * lambda).sin();
        let decl = (lambda.sin() * 23.4397f64.to_radians().sin()).asin();
        let at = |j: f64| DateTime::from_timestamp(((j - 2440587.5) * 86400.0) as i64, 0);
        let hour_angle = |h0: f64| {
            let phi = self.lat.to_radians();
            let cos_w = (h0.to_radians().sin() - phi.sin() * decl.sin()) / (phi.cos() * decl.cos());
            (-1.0..=1.0)
                .contains(&cos_w)
                .then(|| cos_w.acos().to_degrees())
        };
        match self.event {
            Event::Noon => at(transit),
            Event::Rise(h0) => at(transit - hour_angle(h0)? / 360.0),
            Event::Set(h0) => at(transit + hour_angle(h0)? / 360.0),
        }
    }

    /// The first occurrence strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let start = after.date_naive() - Duration::days(1);
        (0..400)
            .filter_map(|d| self.on(start + Duration::days(d)))
            .find(|t| *t > after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn close(a: DateTime<Utc>, b: DateTime<Utc>, minutes: i64) -> bool {
        (a - b).num_minutes().abs() <= minutes
    }

    #[test]
    fn london_on_the_june_solstice() {
        // Published for London 2026-06-21: sunrise 03:43 UTC, sunset 20:21 UTC, solar noon ~12:02 UTC.
        let after = utc("2026-06-21T00:00:00Z");
        let rise = Solar::new("sunrise", 51.5074, -0.1278)
            .unwrap()
            .next_after(after)
            .unwrap();
        assert!(close(rise, utc("2026-06-21T03:43:00Z"), 3), "{rise}");
        let set = Solar::new("sunset", 51.5074, -0.1278)
            .unwrap()
            .next_after(after)
            .unwrap();
        assert!(close(set, utc("2026-06-21T20:21:00Z"), 3), "{set}");
        let noon = Solar::new("solar_noon", 51.5074, -0.1278)
            .unwrap()
            .next_after(after)
            .unwrap();
        assert!(close(noon, utc("2026-06-21T12:02:00Z"), 3), "{noon}");
        let dusk = Solar::new("dusk_civil", 51.5074, -0.1278)
            .unwrap()
            .next_after(after)
            .unwrap();
        assert!(dusk > set && dusk - set < Duration::minutes(60), "{dusk}");
    }

    #[test]
    fn polar_night_skips_to_when_the_sun_rises() {
        // Tromsø has no sunrise between late November and mid January.
        let rise = Solar::new("sunrise", 69.6492, 18.9553)
            .unwrap()
            .next_after(utc("2026-12-01T00:00:00Z"))
            .unwrap();
        assert!(
            rise > utc("2027-01-10T00:00:00Z") && rise < utc("2027-01-20T00:00:00Z"),
            "{rise}"
        );
    }

    #[test]
    fn unknown_events_are_errors() {
        assert!(
            Solar::new("moonrise", 0.0, 0.0)
                .unwrap_err()
                .contains("moonrise")
        );
        assert!(Solar::new("sunrise", 91.0, 0.0).is_err());
    }
}
