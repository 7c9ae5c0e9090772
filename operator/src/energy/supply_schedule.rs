//! A daily supply curve (e.g. a solar array's) in a named time zone: points
//! `HH:MM → watts`, linearly interpolated, wrapping at midnight, with curves
//! of their own for some months. Pure: no clock, no I/O.

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};

use crate::resources::time::time_zone;
use crate::resources::{SchedulePoint, ScheduleSupply};
use crate::validation::minutes_of_day;

/// Why a schedule cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScheduleError {
    #[error("time zone `{0}` does not exist (use an IANA name such as Europe/Berlin)")]
    UnknownTimeZone(String),
    #[error("{field}[{index}].time: `{time}` is not HH:MM")]
    BadTime {
        field: String,
        index: usize,
        time: String,
    },
    #[error("{field}: times must be strictly increasing (`{time}` at index {index})")]
    NotIncreasing {
        field: String,
        index: usize,
        time: String,
    },
    #[error("{field}: a curve needs at least two points, {0} given", .count)]
    TooFewPoints { field: String, count: usize },
    #[error("{field}[{index}].watts: {watts} is not a finite, non-negative number of watts")]
    BadWatts {
        field: String,
        index: usize,
        watts: f64,
    },
    #[error("month {0} is not between 1 and 12")]
    BadMonth(u8),
}

impl ScheduleError {
    /// Reason for the `SupplyStale` condition.
    pub fn reason(&self) -> &'static str {
        match self {
            ScheduleError::UnknownTimeZone(_) => "UnknownTimeZone",
            _ => "ScheduleInvalid",
        }
    }
}

/// One curve: (minute of day, watts), strictly increasing minutes.
#[derive(Debug, Clone, PartialEq)]
struct Curve(Vec<(u32, f64)>);

impl Curve {
    fn parse(field: &str, points: &[SchedulePoint]) -> Result<Self, ScheduleError> {
        if points.len() < 2 {
            return Err(ScheduleError::TooFewPoints {
                field: field.into(),
                count: points.len(),
            });
        }
        let mut out: Vec<(u32, f64)> = Vec::with_capacity(points.len());
        for (index, p) in points.iter().enumerate() {
            let m = minutes_of_day(&p.time).ok_or_else(|| ScheduleError::BadTime {
                field: field.into(),
                index,
                time: p.time.clone(),
            })?;
            if !(p.watts.is_finite() && p.watts >= 0.0) {
                return Err(ScheduleError::BadWatts {
                    field: field.into(),
                    index,
                    watts: p.watts,
                });
            }
            if out.last().is_some_and(|(l, _)| m <= *l) {
                return Err(ScheduleError::NotIncreasing {
                    field: field.into(),
                    index,
                    time: p.time.clone(),
                });
            }
            out.push((m, p.watts));
        }
        Ok(Curve(out))
    }

    /// Watts at `minute` (may be fractional) of the day, interpolating
    /// between the neighbouring points and across midnight.
    fn at(&self, minute: f64) -> f64 {
        let pts = &self.0;
        const DAY: f64 = 1440.0;
        let (first, last) = (pts[0], pts[pts.len() - 1]);
        // Wrap segment: last point → first point of the next day.
        let wrap = |m: f64| {
            let span = DAY - f64::from(last.0) + f64::from(first.0);
            let since = if m >= f64::from(last.0) {
                m - f64::from(last.0)
            } else {
                m + DAY - f64::from(last.0)
            };
            if span <= 0.0 {
                return last.1;
            }
            last.1 + (first.1 - last.1) * (since / span)
        };
        if minute < f64::from(first.0) || minute >= f64::from(last.0) {
            return wrap(minute);
        }
        for w in pts.windows(2) {
            let (a, b) = (w[0], w[1]);
            if minute >= f64::from(a.0) && minute < f64::from(b.0) {
                let t = (minute - f64::from(a.0)) / f64::from(b.0 - a.0);
                return a.1 + (b.1 - a.1) * t;
            }
        }
        last.1
    }
}

/// A checked schedule, ready to answer "how many watts at this instant".
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    tz: TimeZone,
    default: Curve,
    /// Curve index per month (0 = January); `None` uses the default.
    months: [Option<usize>; 12],
    curves: Vec<Curve>,
}

impl Schedule {
    /// Check and compile a schedule spec. Gaps (fewer than two points,
    /// unordered or malformed times), negative watts and unknown zones are
    /// errors naming the cause.
    pub fn new(spec: &ScheduleSupply) -> Result<Self, ScheduleError> {
        let tz = time_zone(&spec.time_zone)
            .map_err(|_| ScheduleError::UnknownTimeZone(spec.time_zone.clone()))?;
        let default = Curve::parse("schedule.points", &spec.points)?;
        let mut months = [None; 12];
        let mut curves = Vec::new();
        for (i, c) in spec.months.iter().enumerate() {
            curves.push(Curve::parse(
                &format!("schedule.months[{i}].points"),
                &c.points,
            )?);
            for m in &c.months {
                if !(1..=12).contains(&m.0) {
                    return Err(ScheduleError::BadMonth(m.0));
                }
                months[usize::from(m.0 - 1)] = Some(i);
            }
        }
        Ok(Self {
            tz,
            default,
            months,
            curves,
        })
    }

    /// The zone the schedule's times are in.
    pub fn time_zone(&self) -> TimeZone {
        self.tz.clone()
    }

    /// Expected watts at `at`.
    pub fn watts_at(&self, at: Timestamp) -> f64 {
        let local = at.to_zoned(self.tz.clone());
        let month = usize::try_from(local.month() - 1).unwrap_or(0);
        let curve = self
            .months
            .get(month)
            .copied()
            .flatten()
            .and_then(|i| self.curves.get(i))
            .unwrap_or(&self.default);
        let minute = f64::from(i32::from(local.hour()) * 60 + i32::from(local.minute()))
            + f64::from(local.second()) / 60.0;
        curve.at(minute)
    }

    /// The first instant after `from` (scanning minute by minute up to
    /// `horizon`) at which `enough(watts)` holds, e.g. "supply × (1 − margin)
    /// covers demand". `None` when it never does within the horizon.
    pub fn next_time(
        &self,
        from: Timestamp,
        horizon: SignedDuration,
        enough: impl Fn(f64) -> bool,
    ) -> Option<Timestamp> {
        let step = SignedDuration::from_mins(1);
        let mut t = from;
        while t.duration_since(from) <= horizon {
            if enough(self.watts_at(t)) {
                return Some(t);
            }
            t += step;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{MonthCurve, MonthNumber};

    fn pts(p: &[(&str, f64)]) -> Vec<SchedulePoint> {
        p.iter()
            .map(|(t, w)| SchedulePoint {
                time: (*t).into(),
                watts: *w,
            })
            .collect()
    }

    fn utc(s: &str) -> Timestamp {
        s.parse().expect("timestamp")
    }

    fn solar(tz: &str) -> ScheduleSupply {
        ScheduleSupply {
            time_zone: tz.into(),
            points: pts(&[("06:00", 0.0), ("12:00", 1000.0), ("18:00", 0.0)]),
            months: vec![],
        }
    }

    #[test]
    fn points_are_interpolated_in_the_named_zone() {
        let s = Schedule::new(&solar("Europe/Berlin")).expect("valid");
        // 09:00 Berlin in January is 08:00 UTC: halfway up.
        assert!((s.watts_at(utc("2025-01-15T08:00:00Z")) - 500.0).abs() < 1e-9);
        // Noon Berlin in July (CEST) is 10:00 UTC: the peak.
        assert!((s.watts_at(utc("2025-07-15T10:00:00Z")) - 1000.0).abs() < 1e-9);
    }

    #[test]
    fn the_curve_wraps_at_midnight() {
        let spec = ScheduleSupply {
            time_zone: "UTC".into(),
            points: pts(&[("04:00", 400.0), ("20:00", 0.0)]),
            months: vec![],
        };
        let s = Schedule::new(&spec).expect("valid");
        // 20:00 → 04:00 is 8 h; midnight is halfway.
        assert!((s.watts_at(utc("2025-03-01T00:00:00Z")) - 200.0).abs() < 1e-9);
        assert!((s.watts_at(utc("2025-03-01T22:00:00Z")) - 100.0).abs() < 1e-9);
        assert!((s.watts_at(utc("2025-03-01T02:00:00Z")) - 300.0).abs() < 1e-9);
    }

    #[test]
    fn a_month_curve_replaces_the_default_in_its_months() {
        let mut spec = solar("UTC");
        spec.months = vec![MonthCurve {
            months: vec![MonthNumber(6), MonthNumber(7)],
            points: pts(&[("00:00", 2000.0), ("23:59", 2000.0)]),
        }];
        let s = Schedule::new(&spec).expect("valid");
        assert_eq!(s.watts_at(utc("2025-06-10T03:00:00Z")), 2000.0);
        assert_eq!(s.watts_at(utc("2025-05-10T03:00:00Z")), 0.0);
    }

    #[test]
    fn an_unknown_zone_is_named() {
        let e = Schedule::new(&solar("Mars/Olympus_Mons")).expect_err("no such zone");
        assert_eq!(e.reason(), "UnknownTimeZone");
        assert!(e.to_string().contains("Mars/Olympus_Mons"), "{e}");
    }

    #[test]
    fn gaps_and_disorder_are_refused() {
        let mut spec = solar("UTC");
        spec.points = pts(&[("12:00", 1.0)]);
        assert!(matches!(
            Schedule::new(&spec),
            Err(ScheduleError::TooFewPoints { .. })
        ));
        spec.points = pts(&[("12:00", 1.0), ("11:00", 1.0)]);
        assert!(matches!(
            Schedule::new(&spec),
            Err(ScheduleError::NotIncreasing { .. })
        ));
        spec.points = pts(&[("12:00", 1.0), ("25:00", 1.0)]);
        assert!(matches!(
            Schedule::new(&spec),
            Err(ScheduleError::BadTime { .. })
        ));
        spec.points = pts(&[("12:00", 1.0), ("13:00", -5.0)]);
        assert!(matches!(
            Schedule::new(&spec),
            Err(ScheduleError::BadWatts { .. })
        ));
    }

    #[test]
    fn the_next_covering_time_is_found_on_the_curve() {
        let s = Schedule::new(&solar("UTC")).expect("valid");
        let t = s
            .next_time(
                utc("2025-03-01T20:00:00Z"),
                SignedDuration::from_hours(24),
                |w| w >= 500.0,
            )
            .expect("the sun rises");
        assert_eq!(t, utc("2025-03-02T09:00:00Z"));
        assert!(
            s.next_time(
                utc("2025-03-01T20:00:00Z"),
                SignedDuration::from_hours(24),
                |w| { w > 5000.0 }
            )
            .is_none()
        );
    }
}
