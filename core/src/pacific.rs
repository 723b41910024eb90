//! The provider's day: Gemini's requests-per-day quota resets at midnight Pacific time.
//!
//! The limiter script runs on Redis's clock and cannot read a tz database, so callers pass
//! it the next few midnights as Unix microseconds and the script picks the day by its own
//! time. Daylight-saving days are 23 h or 25 h long; computing the midnights here, from the
//! tz database, gets them right.
use jiff::{Timestamp, ToSpan, ZonedDateTime, civil::Date, tz::TimeZone};

/// The zone whose midnight resets per-day quotas.
pub const QUOTA_ZONE: &str = "America/Los_Angeles";

fn zone() -> TimeZone {
    // The bundled tz database always has this zone; the fallback only keeps this total.
    TimeZone::get(QUOTA_ZONE).unwrap_or(TimeZone::UTC)
}

/// The start (midnight, Pacific) of the quota day that contains `at`.
pub fn day_start(at: Timestamp) -> Timestamp {
    midnight(at.to_zoned_datetime(zone()).date())
}

/// The midnights (Pacific) that follow `at`, `count` of them, as timestamps.
pub fn next_midnights(at: Timestamp, count: usize) -> Vec<Timestamp> {
    let mut date = at.to_zoned_datetime(zone()).date();
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        date = date.checked_add(1.day()).unwrap_or(date);
        out.push(midnight(date));
    }
    out
}

/// The start (midnight, Pacific, on the 1st) of the month that contains `at`, and of the
/// two months after it: a tenant's monthly budget resets there.
pub fn month_starts(at: Timestamp) -> [Timestamp; 3] {
    let first = at.to_zoned_datetime(zone()).date().first_of_month();
    let next = first.checked_add(1.month()).unwrap_or(first);
    let after = next.checked_add(1.month()).unwrap_or(next);
    [midnight(first), midnight(next), midnight(after)]
}

/// The length of the quota day that starts on `date` (Pacific): 23, 24 or 25 hours.
pub fn day_length_hours(date: Date) -> i64 {
    let start = midnight(date);
    let end = midnight(date.checked_add(1.day()).unwrap_or(date));
    end.duration_since(start).as_secs() / 3600
}

fn midnight(date: Date) -> Timestamp {
    // Midnight exists on every day in Los Angeles (DST changes at 02:00), so compatible
    // disambiguation never has to choose.
    date.to_zoned_datetime(zone())
        .map(|z: ZonedDateTime| z.timestamp())
        .unwrap_or_else(|_| Timestamp::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::civil::date;

    #[test]
    fn dst_days_are_23_and_25_hours() {
        assert_eq!(day_length_hours(date(2026, 3, 8)), 23);
        assert_eq!(day_length_hours(date(2026, 11, 1)), 25);
        assert_eq!(day_length_hours(date(2026, 11, 2)), 24);
    }

    #[test]
    fn next_midnights_cross_a_dst_change() {
        let at: Timestamp = "2026-10-31T20:00:00Z".parse().unwrap(); // 13:00 PDT
        let m = next_midnights(at, 3);
        assert_eq!(m[0].to_string(), "2026-11-01T07:00:00Z"); // PDT midnight
        assert_eq!(m[1].to_string(), "2026-11-02T08:00:00Z"); // PST midnight, 25 h later
        assert_eq!(m[2].to_string(), "2026-11-03T08:00:00Z");
        assert_eq!(day_start(at).to_string(), "2026-10-31T07:00:00Z");
    }
}
