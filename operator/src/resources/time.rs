//! Time as the API keeps it. k8s-openapi's `Time` wraps a
//! `jiff::Timestamp`, and the operator computes in jiff too, so reading a
//! stored `Time` is its field (`t.0`). Writing goes through [`time`], the
//! one converter, with the one precision rule: whole seconds, as the API
//! server stores `metav1.Time`, so what is written compares equal to what
//! is read back.
//!
//! Time zones come from the IANA database compiled into the binary
//! (jiff's `tzdb-bundle-always`): the images are distroless, with no
//! `/usr/share/zoneinfo`, and every replica, test and tool must cut
//! calendar periods by the same rules.

use std::sync::LazyLock;

use jiff::Timestamp;
use jiff::tz::{TimeZone, TimeZoneDatabase};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// A timestamp as the API server stores it: truncated to the second.
pub fn time(t: Timestamp) -> Time {
    Time(Timestamp::from_second(t.as_second()).unwrap_or(t))
}

/// Time from `since` to `now`; zero when `now` is earlier (a clock set
/// back never makes a negative wait).
pub fn elapsed(since: Timestamp, now: Timestamp) -> std::time::Duration {
    std::time::Duration::try_from(now.duration_since(since)).unwrap_or_default()
}

/// The bundled database, opened once: jiff's global `tz::db()` prefers a
/// system copy when there is one, which would make a developer's machine
/// and the container disagree.
static ZONES: LazyLock<TimeZoneDatabase> = LazyLock::new(TimeZoneDatabase::bundled);

/// A time zone not in the database under this exact name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown time zone {0:?}")]
pub struct UnknownZone(pub String);

/// The IANA time zone `name` (for example `Europe/Berlin` or `UTC`),
/// spelt exactly as the database spells it: other tools that read the
/// same spec (kubectl columns, dashboards) may not forgive a lowercase
/// name.
pub fn time_zone(name: &str) -> Result<TimeZone, UnknownZone> {
    let tz = ZONES.get(name).map_err(|_| UnknownZone(name.to_string()))?;
    match tz.iana_name() {
        Some(spelt) if spelt == name => Ok(tz),
        _ => Err(UnknownZone(name.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_time_is_written_to_the_second() {
        let t: Timestamp = "2026-11-24T02:00:05.999Z".parse().expect("time");
        assert_eq!(time(t).0, "2026-11-24T02:00:05Z".parse().expect("time"));
    }

    #[test]
    fn zones_come_from_the_bundled_database_by_their_exact_names() {
        assert!(time_zone("Europe/Berlin").is_ok());
        assert!(time_zone("UTC").is_ok());
        assert_eq!(
            time_zone("europe/berlin"),
            Err(UnknownZone("europe/berlin".into()))
        );
        assert!(time_zone("Mars/Olympus").is_err());
    }
}
