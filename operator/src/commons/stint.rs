//! Stint arithmetic, pure: periods, each member's share of the pool, and
//! standings under the graduated sanctions. The gateway's ledger and the
//! register both rest on these functions, so they take `now` as an argument
//! and touch nothing outside.

use jiff::civil::{Date, DateTime};
use jiff::tz::{AmbiguousOffset, TimeZone};
use jiff::{SignedDuration, Timestamp, ToSpan};

use crate::resources::parse_duration;
use crate::resources::stint_quota::{
    CalendarUnit, Member, MemberState, MemberUsage, PeriodType, StintQuotaSpec,
};
use crate::resources::time::time_zone;

/// Why a quota's period cannot be computed.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum StintError {
    #[error("unknown time zone {0:?}")]
    TimeZone(String),
    #[error("rolling period needs a window")]
    MissingWindow,
    #[error("calendar period needs a unit")]
    MissingUnit,
    #[error("bad window {0:?}: {1}")]
    Window(String, String),
}

/// The current period: usage counted from `start`, reset at `end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeriodWindow {
    pub start: Timestamp,
    pub end: Timestamp,
    /// Rolling periods also count part of the previous window.
    pub rolling: bool,
}

impl PeriodWindow {
    /// Share of the previous window still inside a rolling period at `now`
    /// (the two-window sliding estimate); 0 for calendar periods.
    pub fn previous_weight(&self, now: Timestamp) -> f64 {
        if !self.rolling {
            return 0.0;
        }
        let millis = |d: SignedDuration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let len = millis(self.end.duration_since(self.start)).max(1) as f64;
        let elapsed = millis(now.duration_since(self.start)).clamp(0, len as i64) as f64;
        1.0 - elapsed / len
    }

    /// Seconds until the period resets (at least 1).
    pub fn seconds_to_reset(&self, now: Timestamp) -> i64 {
        self.end.duration_since(now).as_secs().max(1)
    }
}

/// The period containing `now`. Rolling windows are aligned to the Unix
/// epoch, so every gateway replica computes the same boundaries.
pub fn current_period(spec: &StintQuotaSpec, now: Timestamp) -> Result<PeriodWindow, StintError> {
    let p = &spec.period;
    match p.type_ {
        PeriodType::Rolling => {
            let w = p.window.as_deref().ok_or(StintError::MissingWindow)?;
            let d = parse_duration(w).map_err(|e| StintError::Window(w.into(), e.to_string()))?;
            // The API server keeps `Time` to the second: a period start it
            // cannot store would roll the register over on every write.
            if d.subsec_nanos() != 0 || d.as_secs() == 0 {
                return Err(StintError::Window(
                    w.into(),
                    "a rolling window must be a whole number of seconds, at least 1s \
                     (the register keeps times to the second)"
                        .into(),
                ));
            }
            let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
            let t = now.as_millisecond();
            let start_ms = t - t.rem_euclid(ms);
            let start = Timestamp::from_millisecond(start_ms).unwrap_or(now);
            let end = start
                .checked_add(SignedDuration::from_millis(ms))
                .map_err(|e| StintError::Window(w.into(), e.to_string()))?;
            Ok(PeriodWindow {
                start,
                end,
                rolling: true,
            })
        }
        PeriodType::Calendar => {
            let unit = p.unit.ok_or(StintError::MissingUnit)?;
            let tz =
                time_zone(&p.time_zone).map_err(|_| StintError::TimeZone(p.time_zone.clone()))?;
            let local = now.to_zoned(tz.clone()).date();
            let (first, next) = match unit {
                CalendarUnit::Day => (local, local.tomorrow().unwrap_or(local)),
                CalendarUnit::Week => {
                    let back = i64::from(local.weekday().to_monday_zero_offset());
                    let monday = local.checked_sub(back.days()).unwrap_or(local);
                    (monday, monday.checked_add(7.days()).unwrap_or(monday))
                }
                CalendarUnit::Month => {
                    let first = local.first_of_month();
                    (first, first.checked_add(1.month()).unwrap_or(first))
                }
            };
            Ok(PeriodWindow {
                start: local_midnight(&tz, first),
                end: local_midnight(&tz, next),
                rolling: false,
            })
        }
    }
}

/// Midnight of `day` in `tz`, taking the earlier instant when a DST change
/// makes it ambiguous and the first valid instant when it is skipped.
fn local_midnight(tz: &TimeZone, day: Date) -> Timestamp {
    let mut t: DateTime = day.to_datetime(jiff::civil::Time::midnight());
    for _ in 0..4 {
        let local = tz.to_ambiguous_timestamp(t);
        if !matches!(local.offset(), AmbiguousOffset::Gap { .. })
            && let Ok(x) = local.earlier()
        {
            return x;
        }
        t = t.checked_add(30.minutes()).unwrap_or(t);
    }
    TimeZone::UTC.to_timestamp(t).unwrap_or_default()
}

/// Human description, for `kubectl get sq`.
pub fn describe_period(spec: &StintQuotaSpec) -> String {
    let p = &spec.period;
    match p.type_ {
        PeriodType::Rolling => format!("rolling {}", p.window.as_deref().unwrap_or("?")),
        PeriodType::Calendar => {
            let unit = match p.unit {
                Some(CalendarUnit::Day) => "day",
                Some(CalendarUnit::Week) => "week",
                Some(CalendarUnit::Month) => "month",
                None => "?",
            };
            format!("calendar {unit} ({})", p.time_zone)
        }
    }
}

/// A member's stint this period, after sharing the pool: `None` is
/// unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MemberStint {
    pub tokens: Option<i64>,
    pub energy_wh: Option<f64>,
}

/// Every member's stint: a fixed stint where given, else the pool split by
/// weight (default 1) among the members without one.
pub fn member_stints(spec: &StintQuotaSpec) -> Vec<MemberStint> {
    let weighted: i64 = spec
        .members
        .iter()
        .filter(|m| m.stint.is_none())
        .map(|m| i64::from(m.weight.unwrap_or(1).max(1)))
        .sum();
    spec.members
        .iter()
        .map(|m| stint_of(spec, m, weighted))
        .collect()
}

fn stint_of(spec: &StintQuotaSpec, m: &Member, total_weight: i64) -> MemberStint {
    if let Some(s) = &m.stint {
        return MemberStint {
            tokens: s.tokens,
            energy_wh: s.energy_wh,
        };
    }
    let Some(pool) = &spec.pool else {
        return MemberStint::default();
    };
    let w = i64::from(m.weight.unwrap_or(1).max(1));
    let share = w as f64 / total_weight.max(1) as f64;
    MemberStint {
        tokens: pool.tokens.map(|t| ((t as f64) * share).floor() as i64),
        energy_wh: pool.energy_wh.map(|e| e * share),
    }
}

/// Usage as the sanctions see it: this period's, plus the sliding part of
/// the previous one for rolling periods.
pub fn effective_tokens(u: &MemberUsage, previous_weight: f64) -> i64 {
    u.tokens + (u.previous_tokens as f64 * previous_weight).ceil() as i64
}

/// Energy counterpart of [`effective_tokens`].
pub fn effective_energy_wh(u: &MemberUsage, previous_weight: f64) -> f64 {
    u.energy_wh + u.previous_energy_wh * previous_weight
}

/// Fraction of the stint used (the larger of tokens and energy); 0 when
/// unlimited.
pub fn used_fraction(stint: MemberStint, tokens: i64, energy_wh: f64) -> f64 {
    let t = match stint.tokens {
        Some(0) => f64::INFINITY,
        Some(s) => tokens as f64 / s as f64,
        None => 0.0,
    };
    let e = match stint.energy_wh {
        Some(s) if s <= 0.0 => f64::INFINITY,
        Some(s) => energy_wh / s,
        None => 0.0,
    };
    let f = t.max(e);
    if f.is_nan() { 0.0 } else { f }
}

/// Standing for a used fraction under the quota's sanctions.
pub fn standing(spec: &StintQuotaSpec, fraction: f64) -> MemberState {
    let s = &spec.sanctions;
    let pct = fraction * 100.0;
    if pct >= s.suspend_at {
        MemberState::Suspended
    } else if pct >= s.throttle_at {
        MemberState::Throttled
    } else if pct >= s.warn_at {
        MemberState::Warned
    } else {
        MemberState::Ok
    }
}

/// The most a member may be charged this period: the stint scaled by
/// `suspendAt` (past it the member is refused).
pub fn ceiling_tokens(spec: &StintQuotaSpec, stint: MemberStint) -> Option<i64> {
    stint
        .tokens
        .map(|t| ((t as f64) * spec.sanctions.suspend_at / 100.0).floor() as i64)
}

/// Energy counterpart of [`ceiling_tokens`].
pub fn ceiling_energy_wh(spec: &StintQuotaSpec, stint: MemberStint) -> Option<f64> {
    stint
        .energy_wh
        .map(|e| e * spec.sanctions.suspend_at / 100.0)
}

/// Weighted tokens for a request's usage, rounded up so weights never let
/// usage slip through.
pub fn weighted_tokens(spec: &StintQuotaSpec, prompt: i64, completion: i64) -> i64 {
    let w = &spec.token_weights;
    (prompt as f64 * w.prompt + completion as f64 * w.completion).ceil() as i64
}

/// Tokens remaining to the stint (not the ceiling), for the
/// `x-copyhold-stint-remaining` header; `None` when unlimited.
pub fn remaining_tokens(stint: MemberStint, used: i64) -> Option<i64> {
    stint.tokens.map(|t| (t - used).max(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::stint_quota::*;

    fn spec(yaml: &str) -> StintQuotaSpec {
        serde_saphyr::from_str(yaml).expect("spec")
    }

    fn base() -> StintQuotaSpec {
        spec(
            r#"
members:
  - {name: a, apiKeySecret: {name: a}, weight: 3}
  - {name: b, apiKeySecret: {name: b}}
  - {name: c, apiKeySecret: {name: c}, stint: {tokens: 500}}
period: {type: calendar, unit: month, timeZone: Europe/Berlin}
pool: {tokens: 4000, energyWh: 8}
"#,
        )
    }

    fn t(s: &str) -> Timestamp {
        s.parse().expect("time")
    }

    #[test]
    fn the_pool_is_shared_by_weight_and_fixed_stints_stand_apart() {
        let s = member_stints(&base());
        assert_eq!(s[0].tokens, Some(3000));
        assert_eq!(s[1].tokens, Some(1000));
        assert_eq!(s[2].tokens, Some(500));
        assert_eq!(s[2].energy_wh, None);
        assert!((s[0].energy_wh.unwrap() - 6.0).abs() < 1e-9);
    }

    #[test]
    fn a_calendar_month_starts_at_local_midnight() {
        let p = current_period(&base(), t("2026-11-23T10:00:00Z")).unwrap();
        assert_eq!(p.start, t("2026-10-31T23:00:00Z"));
        assert_eq!(p.end, t("2026-11-30T23:00:00Z"));
        // December rolls into the next year.
        let p = current_period(&base(), t("2026-12-31T22:59:00Z")).unwrap();
        assert_eq!(p.end, t("2026-12-31T23:00:00Z"));
        assert!(!p.rolling);
    }

    #[test]
    fn weeks_start_on_monday_and_days_follow_daylight_saving() {
        let mut s = base();
        s.period.unit = Some(CalendarUnit::Week);
        // 2026-11-23 is a Monday.
        let p = current_period(&s, t("2026-11-25T12:00:00Z")).unwrap();
        assert_eq!(p.start, t("2026-11-22T23:00:00Z"));
        s.period.unit = Some(CalendarUnit::Day);
        // 29 March 2026: Berlin skips 02:00-03:00; the day has 23 hours.
        let p = current_period(&s, t("2026-03-29T12:00:00Z")).unwrap();
        assert_eq!(p.end.duration_since(p.start).as_hours(), 23);
    }

    #[test]
    fn a_day_whose_midnight_is_skipped_starts_at_its_first_valid_instant() {
        let mut s = base();
        s.period.unit = Some(CalendarUnit::Day);
        s.period.time_zone = "America/Santiago".into();
        // 6 September 2026: Santiago skips 00:00-01:00; the day starts at
        // 01:00 -03 and the day before ends there.
        let p = current_period(&s, t("2026-09-06T12:00:00Z")).unwrap();
        assert_eq!(p.start, t("2026-09-06T04:00:00Z"));
        assert_eq!(p.end, t("2026-09-07T03:00:00Z"));
        let p = current_period(&s, t("2026-09-06T03:59:59Z")).unwrap();
        assert_eq!(p.start, t("2026-09-05T04:00:00Z"));
        assert_eq!(p.end, t("2026-09-06T04:00:00Z"));
    }

    #[test]
    fn rolling_windows_are_aligned_and_slide_over_the_previous_one() {
        let mut s = base();
        s.period = Period {
            type_: PeriodType::Rolling,
            window: Some("1h".into()),
            unit: None,
            time_zone: "UTC".into(),
        };
        let p = current_period(&s, t("2026-11-23T10:15:00Z")).unwrap();
        assert_eq!(p.start, t("2026-11-23T10:00:00Z"));
        assert!((p.previous_weight(t("2026-11-23T10:15:00Z")) - 0.75).abs() < 1e-9);
        let u = MemberUsage {
            tokens: 10,
            previous_tokens: 100,
            ..Default::default()
        };
        assert_eq!(effective_tokens(&u, 0.75), 85);
    }

    #[test]
    fn bad_zones_and_missing_fields_are_errors() {
        let mut s = base();
        s.period.time_zone = "Mars/Olympus".into();
        assert_eq!(
            current_period(&s, Timestamp::now()),
            Err(StintError::TimeZone("Mars/Olympus".into()))
        );
        s.period.type_ = PeriodType::Rolling;
        assert_eq!(
            current_period(&s, Timestamp::now()),
            Err(StintError::MissingWindow)
        );
    }

    #[test]
    fn standings_follow_the_sanctions() {
        let s = base();
        assert_eq!(standing(&s, 0.5), MemberState::Ok);
        assert_eq!(standing(&s, 0.8), MemberState::Warned);
        assert_eq!(standing(&s, 1.0), MemberState::Throttled);
        assert_eq!(standing(&s, 1.2), MemberState::Suspended);
        let st = MemberStint {
            tokens: Some(1000),
            energy_wh: Some(1.0),
        };
        // Energy can be the binding stint.
        assert!((used_fraction(st, 100, 0.9) - 0.9).abs() < 1e-9);
        assert_eq!(used_fraction(MemberStint::default(), 10_000, 5.0), 0.0);
        assert_eq!(ceiling_tokens(&s, st), Some(1200));
        assert_eq!(remaining_tokens(st, 1100), Some(0));
    }

    #[test]
    fn weighted_tokens_round_up() {
        let mut s = base();
        s.token_weights.prompt = 0.5;
        s.token_weights.completion = 2.0;
        assert_eq!(weighted_tokens(&s, 3, 2), 6);
    }
}
