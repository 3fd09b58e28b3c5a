//! Calendar windows: which hour, day or month a moment falls in, in the operator's time zone.
//! Pure functions of (moment, zone); the ledger keys its totals by the windows they return.

use std::fmt;

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The length of a cap's window: a calendar hour, day or month of the configured zone.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    /// A civil hour (xx:00 to xx:00 local time).
    Hour,
    /// A civil day, local midnight to midnight; 23 or 25 hours on DST changes.
    Day,
    /// A calendar month, local midnight of the 1st to midnight of the next 1st.
    Month,
}

impl Period {
    /// "hour", "day" or "month", as in config files.
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Hour => "hour",
            Period::Day => "day",
            Period::Month => "month",
        }
    }

    /// The calendar window containing `now` in zone `tz`: [start, end). Day/month windows follow
    /// the zone's civil calendar (DST days are 23 or 25 hours long).
    ///
    /// Hours are the hour of the UTC offset in force at `now`, so the repeated hour of a
    /// fall-back night is two windows, not one of two hours. (In the rare zones whose DST shift
    /// is not a whole hour, the hours next to the shift overlap or leave a gap; every moment
    /// still has exactly one window.) At the ends of jiff's range the window is clamped to it.
    pub fn window_at(self, now: Timestamp, tz: &TimeZone) -> (Timestamp, Timestamp) {
        match self {
            Period::Hour => {
                let local = tz.to_datetime(now);
                let into_hour = SignedDuration::new(
                    i64::from(local.minute()) * 60 + i64::from(local.second()),
                    local.subsec_nanosecond(),
                );
                let start = now.checked_sub(into_hour).unwrap_or(Timestamp::MIN);
                let end = start
                    .checked_add(SignedDuration::from_hours(1))
                    .unwrap_or(Timestamp::MAX);
                (start, end)
            }
            Period::Day => {
                let zoned = now.to_zoned_datetime(tz.clone());
                let start = zoned.start_of_day().map(|z| z.timestamp());
                let end = zoned
                    .tomorrow()
                    .and_then(|z| z.start_of_day())
                    .map(|z| z.timestamp());
                (
                    start.unwrap_or(Timestamp::MIN),
                    end.unwrap_or(Timestamp::MAX),
                )
            }
            Period::Month => {
                let zoned = now.to_zoned_datetime(tz.clone());
                let start = zoned
                    .first_of_month()
                    .and_then(|z| z.start_of_day())
                    .map(|z| z.timestamp());
                let end = zoned
                    .last_of_month()
                    .and_then(|z| z.tomorrow())
                    .and_then(|z| z.start_of_day())
                    .map(|z| z.timestamp());
                (
                    start.unwrap_or(Timestamp::MIN),
                    end.unwrap_or(Timestamp::MAX),
                )
            }
        }
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whose spending a cap limits: every cloud endpoint together, or one endpoint by name.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// All cloud endpoints together.
    Global,
    /// One cloud endpoint, by its configured name.
    Endpoint(String),
}

impl Scope {
    /// Whether a request to `endpoint` counts against this scope.
    pub fn covers(&self, endpoint: &str) -> bool {
        match self {
            Scope::Global => true,
            Scope::Endpoint(name) => name == endpoint,
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Global => f.write_str("global"),
            Scope::Endpoint(name) => write!(f, "endpoint {name}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        match s.parse() {
            Ok(t) => t,
            Err(e) => panic!("{s}: {e}"),
        }
    }

    fn zone(name: &str) -> TimeZone {
        match TimeZone::get(name) {
            Ok(tz) => tz,
            Err(e) => panic!("{name}: {e}"),
        }
    }

    fn window(period: Period, now: &str, tz: &str) -> (String, String) {
        let (start, end) = period.window_at(ts(now), &zone(tz));
        (start.to_string(), end.to_string())
    }

    fn golden(start: &str, end: &str) -> (String, String) {
        (start.to_string(), end.to_string())
    }

    #[test]
    fn utc_hour_window_is_the_clock_hour() {
        assert_eq!(
            window(Period::Hour, "2026-12-07T13:45:12.5Z", "UTC"),
            golden("2026-12-07T13:00:00Z", "2026-12-07T14:00:00Z")
        );
        // The boundary belongs to the window it starts.
        assert_eq!(
            window(Period::Hour, "2026-12-07T14:00:00Z", "UTC"),
            golden("2026-12-07T14:00:00Z", "2026-12-07T15:00:00Z")
        );
        assert_eq!(
            window(Period::Hour, "2026-12-07T13:59:59.999999999Z", "UTC"),
            golden("2026-12-07T13:00:00Z", "2026-12-07T14:00:00Z")
        );
    }

    #[test]
    fn utc_day_window_is_midnight_to_midnight() {
        assert_eq!(
            window(Period::Day, "2026-12-07T23:59:59Z", "UTC"),
            golden("2026-12-07T00:00:00Z", "2026-12-08T00:00:00Z")
        );
        assert_eq!(
            window(Period::Day, "2026-12-08T00:00:00Z", "UTC"),
            golden("2026-12-08T00:00:00Z", "2026-12-09T00:00:00Z")
        );
    }

    #[test]
    fn utc_month_window_rolls_over_the_year() {
        assert_eq!(
            window(Period::Month, "2026-12-31T23:59:59Z", "UTC"),
            golden("2026-12-01T00:00:00Z", "2027-01-01T00:00:00Z")
        );
        assert_eq!(
            window(Period::Month, "2027-01-01T00:00:00Z", "UTC"),
            golden("2027-01-01T00:00:00Z", "2027-02-01T00:00:00Z")
        );
        assert_eq!(
            window(Period::Month, "2028-02-15T12:00:00Z", "UTC"),
            golden("2028-02-01T00:00:00Z", "2028-03-01T00:00:00Z")
        );
    }

    #[test]
    fn spring_forward_day_in_new_york_is_23_hours() {
        let (start, end) =
            Period::Day.window_at(ts("2026-03-08T12:00:00Z"), &zone("America/New_York"));
        assert_eq!(start, ts("2026-03-08T05:00:00Z")); // midnight EST
        assert_eq!(end, ts("2026-03-09T04:00:00Z")); // midnight EDT
        assert_eq!(end.duration_since(start), SignedDuration::from_hours(23));
    }

    #[test]
    fn fall_back_day_in_new_york_is_25_hours() {
        let (start, end) =
            Period::Day.window_at(ts("2026-11-01T12:00:00Z"), &zone("America/New_York"));
        assert_eq!(start, ts("2026-11-01T04:00:00Z")); // midnight EDT
        assert_eq!(end, ts("2026-11-02T05:00:00Z")); // midnight EST
        assert_eq!(end.duration_since(start), SignedDuration::from_hours(25));
    }

    #[test]
    fn repeated_fall_back_hour_is_two_windows() {
        let ny = zone("America/New_York");
        // 01:30 EDT, then 01:30 EST an hour later.
        let first = Period::Hour.window_at(ts("2026-11-01T05:30:00Z"), &ny);
        let second = Period::Hour.window_at(ts("2026-11-01T06:30:00Z"), &ny);
        assert_eq!(
            first,
            (ts("2026-11-01T05:00:00Z"), ts("2026-11-01T06:00:00Z"))
        );
        assert_eq!(
            second,
            (ts("2026-11-01T06:00:00Z"), ts("2026-11-01T07:00:00Z"))
        );
    }

    #[test]
    fn non_utc_zone_day_starts_at_local_midnight() {
        assert_eq!(
            window(Period::Day, "2026-12-07T20:00:00Z", "Asia/Tokyo"),
            golden("2026-12-07T15:00:00Z", "2026-12-08T15:00:00Z")
        );
        assert_eq!(
            window(Period::Month, "2026-11-30T16:00:00Z", "Asia/Tokyo"),
            golden("2026-11-30T15:00:00Z", "2026-12-31T15:00:00Z")
        );
    }

    #[test]
    fn half_hour_offset_zone_hours_start_at_local_hour() {
        assert_eq!(
            window(Period::Hour, "2026-12-07T04:10:00Z", "Asia/Kolkata"),
            golden("2026-12-07T03:30:00Z", "2026-12-07T04:30:00Z")
        );
    }

    #[test]
    fn scope_display_and_cover() {
        assert_eq!(Scope::Global.to_string(), "global");
        assert_eq!(
            Scope::Endpoint("openai".into()).to_string(),
            "endpoint openai"
        );
        assert!(Scope::Global.covers("x"));
        assert!(Scope::Endpoint("x".into()).covers("x"));
        assert!(!Scope::Endpoint("x".into()).covers("y"));
    }
}
