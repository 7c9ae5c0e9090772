//! Supply against draw over the last 24 hours, kept bounded in the
//! EnergyBudget's status by the energy controller. The register page draws
//! its chart from it, so every gateway replica (a restarted one included)
//! shows the same history, and nothing else has to store it.
//!
//! One point per 15-minute bucket: the mean of the evaluations that fell in
//! it (96 points a day, about 10 KiB of status).

use jiff::{SignedDuration, Timestamp};

use crate::resources::energy_budget::PowerSample;
use crate::resources::time::time;

/// Width of one point.
pub const BUCKET: SignedDuration = SignedDuration::from_mins(15);
/// How far back points are kept.
pub const WINDOW: SignedDuration = SignedDuration::from_hours(24);

/// The start of the bucket holding `t`.
fn bucket_of(t: Timestamp) -> Timestamp {
    let ms = BUCKET.as_secs() * 1000;
    let at = t.as_millisecond();
    Timestamp::from_millisecond(at - at.rem_euclid(ms)).unwrap_or(t)
}

/// Add one evaluation's supply and draw (watts) at `now`: folded into the
/// mean of the current bucket, or a new point; points older than
/// [`WINDOW`] are dropped. Readings that are not finite are skipped.
pub fn record(history: &mut Vec<PowerSample>, now: Timestamp, supply_w: f64, draw_w: f64) {
    if !supply_w.is_finite() || !draw_w.is_finite() {
        return;
    }
    let bucket = bucket_of(now);
    match history.last_mut() {
        Some(last) if last.at.0 == bucket => {
            let n = f64::from(last.evaluations.max(1));
            last.supply_watts = round((last.supply_watts * n + supply_w) / (n + 1.0));
            last.draw_watts = round((last.draw_watts * n + draw_w) / (n + 1.0));
            last.evaluations = last.evaluations.max(1).saturating_add(1);
        }
        _ => history.push(PowerSample {
            at: time(bucket),
            supply_watts: round(supply_w),
            draw_watts: round(draw_w),
            evaluations: 1,
        }),
    }
    let oldest = now - WINDOW;
    history.retain(|p| p.at.0 > oldest && p.at.0 <= bucket);
}

/// Watts to the tenth, as the rest of the status.
fn round(w: f64) -> f64 {
    (w * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Timestamp {
        s.parse().expect("time")
    }

    #[test]
    fn evaluations_in_one_bucket_are_averaged_into_one_point() {
        let mut h = Vec::new();
        record(&mut h, t("2026-12-01T10:00:05Z"), 1000.0, 400.0);
        record(&mut h, t("2026-12-01T10:00:20Z"), 800.0, 500.0);
        record(&mut h, t("2026-12-01T10:14:59Z"), 600.0, 600.0);
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].at, time(t("2026-12-01T10:00:00Z")));
        assert_eq!((h[0].supply_watts, h[0].draw_watts), (800.0, 500.0));
        record(&mut h, t("2026-12-01T10:15:00Z"), 10.0, 20.0);
        assert_eq!(h.len(), 2);
        assert_eq!((h[1].supply_watts, h[1].draw_watts), (10.0, 20.0));
    }

    #[test]
    fn a_day_of_evaluations_keeps_at_most_a_days_points() {
        let mut h = Vec::new();
        let start = t("2026-12-01T00:00:00Z");
        // Three days at one evaluation a minute.
        for m in 0..(3 * 24 * 60) {
            record(&mut h, start + SignedDuration::from_mins(m), m as f64, 1.0);
        }
        assert_eq!(h.len(), 96);
        let now = start + SignedDuration::from_mins(3 * 24 * 60 - 1);
        assert!(h.iter().all(|p| p.at.0 > now - WINDOW));
        // A reading that is not a number changes nothing.
        let before = h.clone();
        record(&mut h, now, f64::NAN, 1.0);
        assert_eq!(h, before);
    }

    #[test]
    fn a_clock_set_back_drops_points_from_the_future() {
        let mut h = Vec::new();
        record(&mut h, t("2026-12-01T12:00:00Z"), 1.0, 1.0);
        record(&mut h, t("2026-12-01T11:00:00Z"), 2.0, 2.0);
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].supply_watts, 2.0);
    }
}
