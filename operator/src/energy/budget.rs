//! The energy budget's decisions, with no I/O: the allowance, the fail-safe
//! supply, the degradation ladder and when to expect the sun back. The
//! reconciler (`controller::energy_budget`) and the simulator
//! (`copyhold simulate budget`) run this same code; they differ only in
//! where readings come from and how decisions are carried out.
//!
//! The ladder has four rungs, always in this order; a policy enables a
//! subset, and disabled rungs are skipped:
//!
//! | step | rung | carried out by |
//! | --- | --- | --- |
//! | 1 | power cap | `POST /admin/power-limit` on the covered nodes |
//! | 2 | shed deferrable | ModelDeployments of priority `deferrable` run `minReplicas` |
//! | 3 | shed standard | the same for `standard`; `essential` is never shed |
//! | 4 | defer | the budget's `Deferring` condition: the gateway answers deferrable requests 503 + `Retry-After` |
//!
//! Rules:
//! - Power cap: continuous. While it is in force its limit is set every
//!   evaluation between `minPercent` and 100 % of rated power so the draw
//!   fills the allowance less the hysteresis band ([`Ladder::cap_fraction`],
//!   [`Outcome::cap`]); changing it is not a step change. The ladder steps
//!   past it only when `minPercent` is not enough.
//! - Down: while draw exceeds the allowance, take rungs in order, as many
//!   in one evaluation as the callers' estimates of their savings say are
//!   needed (at least one), right away: the allowance is the hard line.
//! - Up: one rung at a time, and only once the headroom left after undoing
//!   it (draw + the caller's estimate of what it restores) has stayed at or
//!   above `hysteresis × allowance` for `dwell`, and `dwell` has passed since
//!   the last change.
//! - No reversal within dwell: for `dwell` after a climb the ladder does not
//!   step down again. A surprise in that window is absorbed by the margin
//!   (the allowance already keeps `marginPercent` of the supply unused), and
//!   climbs are made only with hysteresis headroom, so this is rare.

use std::time::Duration;

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};

use crate::energy::supply_schedule::Schedule;
use crate::resources::time::elapsed;
use crate::resources::{LadderPolicy, SheddablePriority, parse_duration};

/// `min(ceiling, supply × (1 − margin))`, never negative.
pub fn allowance(ceiling_watts: f64, supply_watts: f64, margin_percent: f64) -> f64 {
    let margin = (margin_percent / 100.0).clamp(0.0, 1.0);
    (supply_watts.max(0.0) * (1.0 - margin))
        .min(ceiling_watts)
        .max(0.0)
}

/// How the supply is judged and replaced when its signal fails.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FailSafe {
    /// Oldest reading still trusted.
    pub max_age: Duration,
    /// Time over which the last good reading falls to the floor.
    pub decay: Duration,
    /// Supply assumed once decayed (and with no reading ever).
    pub floor_watts: f64,
}

/// The supply a decision uses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SupplyEstimate {
    pub watts: f64,
    /// The reading is older than `max_age` (or there never was one): the
    /// value is the fail-safe one.
    pub stale: bool,
}

impl FailSafe {
    /// The supply to use at `now` given the last good reading (value and
    /// when it was taken): the reading itself while fresh; then a value
    /// falling linearly from it to the floor over `decay`, starting when
    /// the reading turned stale; the floor when there never was a reading.
    /// Never more than the last good reading, never unlimited.
    pub fn supply(&self, last_good: Option<(f64, Timestamp)>, now: Timestamp) -> SupplyEstimate {
        let Some((watts, at)) = last_good else {
            return SupplyEstimate {
                watts: self.floor_watts,
                stale: true,
            };
        };
        let age = elapsed(at, now);
        if age <= self.max_age {
            return SupplyEstimate {
                watts,
                stale: false,
            };
        }
        if watts <= self.floor_watts {
            return SupplyEstimate { watts, stale: true };
        }
        let over = (age - self.max_age).as_secs_f64();
        let frac = if self.decay.is_zero() {
            1.0
        } else {
            (over / self.decay.as_secs_f64()).min(1.0)
        };
        SupplyEstimate {
            watts: watts - (watts - self.floor_watts) * frac,
            stale: true,
        }
    }
}

/// A rung of the ladder; its number is the `step` shown in the status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rung {
    PowerCap = 1,
    ShedDeferrable = 2,
    ShedStandard = 3,
    Defer = 4,
}

impl Rung {
    pub const ALL: [Rung; 4] = [
        Rung::PowerCap,
        Rung::ShedDeferrable,
        Rung::ShedStandard,
        Rung::Defer,
    ];

    pub fn step(self) -> u8 {
        self as u8
    }

    pub fn from_step(step: u8) -> Option<Rung> {
        Rung::ALL.into_iter().find(|r| r.step() == step)
    }

    /// One word for `kubectl get` while this is the highest rung in force.
    pub fn state(self) -> &'static str {
        match self {
            Rung::PowerCap => "PowerCapped",
            Rung::ShedDeferrable | Rung::ShedStandard => "Shedding",
            Rung::Defer => "Deferring",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Rung::PowerCap => "GPU power limits lowered",
            Rung::ShedDeferrable => "deferrable replicas shed",
            Rung::ShedStandard => "standard replicas shed",
            Rung::Defer => "deferrable requests deferred",
        }
    }
}

/// One word for `kubectl get` at `step`.
pub fn state_of(step: u8) -> &'static str {
    Rung::from_step(step).map_or("WithinBudget", Rung::state)
}

/// Watts per rung, indexed by rung (a caller's estimates).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RungWatts(pub [f64; 4]);

impl RungWatts {
    pub fn get(&self, r: Rung) -> f64 {
        self.0[usize::from(r.step() - 1)]
    }
    pub fn set(&mut self, r: Rung, w: f64) {
        self.0[usize::from(r.step() - 1)] = w;
    }
}

/// The ladder a policy enables.
#[derive(Debug, Clone, PartialEq)]
pub struct Ladder {
    /// Enabled rungs, ascending.
    pub rungs: Vec<Rung>,
    /// Headroom needed to climb, as a fraction of the allowance.
    pub hysteresis: f64,
    pub dwell: Duration,
    /// After a step down, time for it to take effect (Pods to stop, limits
    /// to bite) before another is taken on a draw that has not fallen yet.
    pub settle: Duration,
    /// The power cap's lowest limit, as a fraction of rated power
    /// (`powerCap.minPercent`).
    pub min_cap: f64,
}

impl Ladder {
    /// The ladder of a policy; an unparsable dwell is an error.
    pub fn from_policy(p: &LadderPolicy) -> Result<Self, String> {
        let mut rungs = Vec::new();
        if p.power_cap.enabled {
            rungs.push(Rung::PowerCap);
        }
        if p.shed.contains(&SheddablePriority::Deferrable) {
            rungs.push(Rung::ShedDeferrable);
        }
        if p.shed.contains(&SheddablePriority::Standard) {
            rungs.push(Rung::ShedStandard);
        }
        if p.defer {
            rungs.push(Rung::Defer);
        }
        Ok(Self {
            rungs,
            hysteresis: (p.hysteresis_percent / 100.0).clamp(0.0, 1.0),
            dwell: parse_duration(&p.dwell).map_err(|e| e.to_string())?,
            settle: Duration::ZERO,
            min_cap: (p.power_cap.min_percent / 100.0).clamp(0.0, 1.0),
        })
    }

    /// The same ladder with a settle time (capped at the dwell).
    pub fn with_settle(mut self, settle: Duration) -> Self {
        self.settle = settle.min(self.dwell);
        self
    }

    /// Rungs in force at `step`.
    pub fn active(&self, step: u8) -> impl Iterator<Item = Rung> + '_ {
        self.rungs.iter().copied().filter(move |r| r.step() <= step)
    }

    /// Whether `rung` is in force at `step`.
    pub fn in_force(&self, step: u8, rung: Rung) -> bool {
        self.active(step).any(|r| r == rung)
    }

    /// The highest rung in force at `step`.
    pub fn top(&self, step: u8) -> Option<Rung> {
        self.active(step).last()
    }

    /// The power limit (fraction of rated power) that brings a draw of
    /// `uncapped` watts (what the nodes would draw with no cap) down to the
    /// allowance less the hysteresis band: the inverse of [`draw_factor`]
    /// at `allowance × (1 − hysteresis) / uncapped`, floored to a whole
    /// percent (so the draw stays at or under that target) and clamped to
    /// `[min_cap, 1]`. At `min_cap` the draw may still be over the target.
    pub fn cap_fraction(&self, allowance: f64, uncapped: f64) -> f64 {
        let target = allowance.max(0.0) * (1.0 - self.hysteresis);
        let want = if uncapped.is_nan() {
            0.0
        } else if uncapped <= 0.0 {
            1.0
        } else {
            limit_for_factor(target / uncapped)
        };
        ((want * 100.0 + 1e-9).floor() / 100.0).clamp(self.min_cap, 1.0)
    }

    /// The power limit to apply at `step` (`None` where the cap is not in
    /// force): continuous ([`Ladder::cap_fraction`]) when the reading says
    /// what the nodes would draw uncapped at that step (the step stayed,
    /// or the power cap was just taken from step 0, which it does not
    /// change); `min_cap` otherwise (a shedding rung just taken or undone,
    /// or no estimate).
    fn cap_at(&self, step: u8, before: u8, r: &Reading) -> Option<f64> {
        if !self.in_force(step, Rung::PowerCap) {
            return None;
        }
        let same_plant = step == before || (before == 0 && self.top(step) == Some(Rung::PowerCap));
        match r.uncapped {
            Some(u) if same_plant => Some(self.cap_fraction(r.allowance, u)),
            _ => Some(self.min_cap),
        }
    }

    /// Decide what to do now. Pure: the same state and reading always give
    /// the same outcome.
    pub fn evaluate(&self, state: &LadderState, r: &Reading) -> Outcome {
        let current = self.top(state.step).map_or(0, Rung::step);
        let mut out = self.decide(state, r);
        out.cap = self.cap_at(out.state.step, current, r);
        out
    }

    fn decide(&self, state: &LadderState, r: &Reading) -> Outcome {
        let mut next = state.clone();
        // A policy change may leave the step between enabled rungs: the
        // highest enabled rung at or below it is what is in force.
        let current = self.top(state.step).map_or(0, Rung::step);
        next.step = current;
        // With the power cap in force and an uncapped estimate, the limit
        // is re-set every evaluation: the draw to judge is the one under
        // the limit this evaluation sets, not the one read under the last.
        let capped = self.in_force(current, Rung::PowerCap);
        let draw = match r.uncapped {
            Some(u) if capped => u.max(0.0) * draw_factor(self.cap_fraction(r.allowance, u)),
            _ => r.draw,
        };
        let since_change = state.last_change.map(|t| elapsed(t, r.now));
        let dwell_passed = since_change.is_none_or(|d| d >= self.dwell);

        if draw > r.allowance {
            next.headroom_since = None;
            let climbed_recently = state.last_direction == Some(Direction::Up) && !dwell_passed;
            if climbed_recently {
                return Outcome::hold(next, Hold::NoReversalWithinDwell);
            }
            let settling = state.last_direction == Some(Direction::Down)
                && since_change.is_some_and(|d| d < self.settle);
            if settling {
                return Outcome::hold(next, Hold::Settling);
            }
            let mut projected = draw;
            let mut target = current;
            for rung in self.rungs.iter().copied().filter(|x| x.step() > current) {
                target = rung.step();
                projected -= r.savings.get(rung).max(0.0);
                if projected <= r.allowance {
                    break;
                }
            }
            if target == current {
                return Outcome::hold(next, Hold::AtTop);
            }
            next.step = target;
            next.last_change = Some(r.now);
            next.last_direction = Some(Direction::Down);
            return Outcome {
                change: Some(StepChange {
                    from: current,
                    to: target,
                    direction: Direction::Down,
                }),
                state: next,
                hold: None,
                cap: None,
            };
        }

        let Some(top) = self.top(current) else {
            next.headroom_since = None;
            return Outcome::hold(next, Hold::Within);
        };
        // With an uncapped estimate: undoing the power cap restores the
        // uncapped draw; undoing a rung above it restores the rung's
        // (uncapped) estimate under the lowest limit.
        let after = match r.uncapped {
            Some(u) if top == Rung::PowerCap => u,
            Some(u) if capped => (u + r.restore.get(top).max(0.0)) * draw_factor(self.min_cap),
            _ => r.draw + r.restore.get(top).max(0.0),
        };
        let holds = r.allowance - after >= self.hysteresis * r.allowance;
        if !holds {
            next.headroom_since = None;
            return Outcome::hold(next, Hold::NoHeadroom);
        }
        let since = *next.headroom_since.get_or_insert(r.now);
        let held = elapsed(since, r.now);
        if held < self.dwell || !dwell_passed {
            return Outcome::hold(next, Hold::Dwell);
        }
        let target = self
            .rungs
            .iter()
            .copied()
            .rfind(|x| x.step() < top.step())
            .map_or(0, Rung::step);
        next.step = target;
        next.last_change = Some(r.now);
        next.last_direction = Some(Direction::Up);
        next.headroom_since = None;
        Outcome {
            change: Some(StepChange {
                from: current,
                to: target,
                direction: Direction::Up,
            }),
            state: next,
            hold: None,
            cap: None,
        }
    }

    /// Seconds until the ladder could climb out of `Deferring`: at least
    /// what remains of the dwell, and, with a schedule, until the
    /// schedule's allowance covers `demand_watts` with hysteresis headroom,
    /// plus the dwell that headroom must hold. At most a day.
    pub fn retry_after(
        &self,
        state: &LadderState,
        now: Timestamp,
        demand_watts: f64,
        schedule: Option<(&Schedule, f64, f64)>,
    ) -> i64 {
        const DAY: i64 = 86_400;
        let dwell = SignedDuration::try_from(self.dwell).unwrap_or(SignedDuration::ZERO);
        let mut earliest = now + dwell;
        if let Some(since) = state.headroom_since {
            earliest = since + dwell;
        }
        if let Some(t) = state.last_change {
            earliest = earliest.max(t + dwell);
        }
        if let Some((schedule, ceiling, margin)) = schedule {
            let h = self.hysteresis;
            let covers = |w: f64| allowance(ceiling, w, margin) * (1.0 - h) >= demand_watts;
            match schedule.next_time(now, SignedDuration::from_hours(24), covers) {
                Some(t) => earliest = earliest.max(t + dwell),
                None => return DAY,
            }
        }
        earliest.duration_since(now).as_secs().clamp(1, DAY)
    }
}

/// Which way a step change went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Down,
    Up,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Down => "Down",
            Direction::Up => "Up",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "Down" => Some(Direction::Down),
            "Up" => Some(Direction::Up),
            _ => None,
        }
    }
}

/// What the ladder remembers between evaluations; the reconciler keeps it
/// in the budget's status, so a restarted or failed-over controller goes on
/// where the last one stopped.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LadderState {
    /// 0 (nothing) or the number of the highest rung in force.
    pub step: u8,
    pub last_change: Option<Timestamp>,
    pub last_direction: Option<Direction>,
    /// Since when the headroom to climb has held without a break.
    pub headroom_since: Option<Timestamp>,
}

/// One evaluation's inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub now: Timestamp,
    pub allowance: f64,
    pub draw: f64,
    /// Estimated watts each rung would save if taken now.
    pub savings: RungWatts,
    /// Estimated watts each rung in force would add back if undone now.
    pub restore: RungWatts,
    /// What the nodes would draw now with no power cap, at the step in
    /// force. With it, the power cap is continuous (see
    /// [`Ladder::cap_fraction`]) and, while the cap is in force, `restore`
    /// of the rungs above it is read as uncapped watts; without it, the
    /// cap is `min_cap`.
    pub uncapped: Option<f64>,
}

/// A change of step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepChange {
    pub from: u8,
    pub to: u8,
    pub direction: Direction,
}

/// Why the step stays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Within the allowance with nothing in force.
    Within,
    /// Over the allowance with every enabled rung taken.
    AtTop,
    /// Over the allowance within dwell of a climb.
    NoReversalWithinDwell,
    /// Over the allowance, but the last step down is still taking effect.
    Settling,
    /// Not enough headroom to undo the top rung.
    NoHeadroom,
    /// Headroom holds, but not yet for the dwell.
    Dwell,
}

/// The decision of one evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub state: LadderState,
    pub change: Option<StepChange>,
    pub hold: Option<Hold>,
    /// The GPU power limit to set on the covered nodes, as a fraction of
    /// their rated power; `None` when the power cap is not in force. Its
    /// changes within a step are not step changes.
    pub cap: Option<f64>,
}

impl Outcome {
    fn hold(state: LadderState, why: Hold) -> Self {
        Self {
            state,
            change: None,
            hold: Some(why),
            cap: None,
        }
    }
}

/// Fraction of a busy node's draw left under the power cap: capping at
/// `p` % of rated power lands about halfway between (cards rarely run at
/// their full rating). The simulator's plant uses the same figure.
pub fn cap_factor(min_percent: f64) -> f64 {
    draw_factor(min_percent / 100.0)
}

/// Fraction of a busy node's draw left under a power limit of `limit`
/// (fraction of rated power): `(1 + limit) / 2`, as [`cap_factor`].
pub fn draw_factor(limit: f64) -> f64 {
    let p = limit.clamp(0.0, 1.0);
    p + (1.0 - p) / 2.0
}

/// The power limit (fraction of rated power) that leaves `factor` of the
/// draw: the inverse of [`draw_factor`], clamped to `[0, 1]`.
pub fn limit_for_factor(factor: f64) -> f64 {
    (2.0 * factor - 1.0).clamp(0.0, 1.0)
}

/// Share of a deferred model's draw that deferring its requests saves (the
/// rest is the replicas' idle power).
pub const DEFER_SAVING: f64 = 0.5;

/// A ModelDeployment as the shedding rungs see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sheddable {
    /// `namespace/name`.
    pub key: String,
    pub priority: crate::resources::Priority,
    /// The most it may run: `spec.replicas`, or `autoscaling.maxReplicas`
    /// when larger (an autoscaled model is capped even while at its floor).
    pub replicas: i32,
    /// `autoscaling.minReplicas` (0 without autoscaling).
    pub min_replicas: i32,
}

/// Replicas each ModelDeployment should run at `step`: `minReplicas` for
/// the priorities whose shedding rung is in force, untouched otherwise.
/// Returns only those that are cut (target below `replicas`). `essential`
/// is never shed, whatever the ladder says.
pub fn shed_plan(ladder: &Ladder, step: u8, mds: &[Sheddable]) -> Vec<(String, i32)> {
    use crate::resources::Priority;
    mds.iter()
        .filter(|m| match m.priority {
            Priority::Essential => false,
            Priority::Deferrable => ladder.in_force(step, Rung::ShedDeferrable),
            Priority::Standard => ladder.in_force(step, Rung::ShedStandard),
        })
        .filter_map(|m| {
            let target = shed_target(m.min_replicas, m.replicas);
            (target < m.replicas).then(|| (m.key.clone(), target))
        })
        .collect()
}

/// The replicas a shedding rung leaves a model: its minimum, never more
/// than it may run. Every budget sheds a model to this same target.
pub fn shed_target(min_replicas: i32, ceiling: i32) -> i32 {
    min_replicas.max(0).min(ceiling)
}

/// Energy counted "today" in a time zone: what the status shows.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EnergyToday {
    pub energy_wh: f64,
    pub renewable_wh: f64,
}

impl EnergyToday {
    /// Add the interval since `last` (drawing `draw` watts against `supply`
    /// watts of renewable supply), starting afresh when the local day in
    /// `tz` changed. Intervals longer than `max_gap` (a controller that was
    /// down) are counted only up to `max_gap`.
    pub fn advance(
        self,
        last: Option<Timestamp>,
        now: Timestamp,
        draw: f64,
        supply: f64,
        tz: TimeZone,
        max_gap: Duration,
    ) -> (Self, f64) {
        let Some(last) = last else {
            return (self, 0.0);
        };
        let day = |t: Timestamp| t.to_zoned(tz.clone()).date();
        let mut today = if day(last) == day(now) {
            self
        } else {
            EnergyToday::default()
        };
        let dt = elapsed(last, now).min(max_gap).as_secs_f64();
        let joules = draw.max(0.0) * dt;
        today.energy_wh += joules / 3600.0;
        today.renewable_wh += draw.max(0.0).min(supply.max(0.0)) * dt / 3600.0;
        (today, joules)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_750_000_000 + s).expect("valid")
    }

    fn ladder() -> Ladder {
        Ladder::from_policy(&LadderPolicy {
            dwell: "60s".into(),
            hysteresis_percent: 10.0,
            ..Default::default()
        })
        .expect("valid")
    }

    fn reading(now: i64, allowance: f64, draw: f64) -> Reading {
        Reading {
            now: t(now),
            allowance,
            draw,
            savings: RungWatts([10.0; 4]),
            restore: RungWatts([10.0; 4]),
            uncapped: None,
        }
    }

    /// Run the ladder over (time, allowance, draw) and return the steps.
    fn run(l: &Ladder, series: &[(i64, f64, f64)]) -> Vec<u8> {
        let mut s = LadderState::default();
        series
            .iter()
            .map(|&(now, a, d)| {
                s = l.evaluate(&s, &reading(now, a, d)).state;
                s.step
            })
            .collect()
    }

    fn with_uncapped(mut r: Reading, u: f64) -> Reading {
        r.uncapped = Some(u);
        r
    }

    #[test]
    fn the_cap_fraction_tracks_the_allowance_less_the_band() {
        let l = ladder(); // minPercent 60, hysteresis 10 %
        assert_eq!(l.min_cap, 0.6);
        // Target 90 W of 100 W uncapped: a draw factor of 0.9 → limit 0.8.
        let f = l.cap_fraction(100.0, 100.0);
        assert!((f - 0.8).abs() < 1e-9, "{f}");
        // More allowance, higher limit; the draw lands on or under the target.
        let mut last = 0.0;
        for a in [90.0, 95.0, 100.0, 105.0, 110.0] {
            let f = l.cap_fraction(a, 100.0);
            assert!(f >= last, "monotone: {f} after {last}");
            assert!(100.0 * draw_factor(f) <= a * 0.9 + 1e-9, "{a}: {f}");
            last = f;
        }
    }

    #[test]
    fn the_cap_fraction_clamps_at_min_percent_and_never_exceeds_one() {
        let l = ladder();
        assert_eq!(l.cap_fraction(10.0, 1000.0), 0.6);
        assert_eq!(l.cap_fraction(0.0, 1000.0), 0.6);
        assert_eq!(l.cap_fraction(f64::NAN.max(0.0), f64::NAN), 0.6);
        assert_eq!(l.cap_fraction(1000.0, 10.0), 1.0);
        assert_eq!(l.cap_fraction(1000.0, 0.0), 1.0);
        for u in (1..400).map(|i| f64::from(i) * 2.5) {
            let f = l.cap_fraction(100.0, u);
            assert!((0.6..=1.0).contains(&f), "{u}: {f}");
        }
    }

    #[test]
    fn the_cap_fraction_never_raises_the_draw_above_the_allowance() {
        let l = ladder();
        for a in (0..60).map(|i| f64::from(i) * 7.0) {
            for u in (0..120).map(|i| f64::from(i) * 3.7) {
                let f = l.cap_fraction(a, u);
                let capped = u * draw_factor(f);
                // Either the draw fits the allowance less the band, or
                // the cap is already at its lowest (and the ladder steps on).
                assert!(
                    capped <= a * 0.9 + 1e-9 || f == l.min_cap,
                    "a {a} u {u}: {f} → {capped}"
                );
                // Never more than the lowest limit would let through, once
                // that is over the target.
                assert!(capped <= (a * 0.9).max(u * draw_factor(l.min_cap)) + 1e-9);
            }
        }
    }

    #[test]
    fn on_the_power_cap_rung_the_limit_follows_the_allowance_without_a_step_change() {
        let l = ladder();
        let mut s = LadderState::default();
        // 105 W uncapped against 100 W: the cap is taken, set to fill 90 W.
        let out = l.evaluate(&s, &with_uncapped(reading(0, 100.0, 105.0), 105.0));
        assert_eq!(out.state.step, 1);
        let f0 = out.cap.expect("capped");
        assert!(105.0 * draw_factor(f0) <= 90.0 + 1e-9 && f0 > 0.6, "{f0}");
        s = out.state;
        // Demand rises to 120 W (read 120 × factor under the limit): the
        // lowest limit (0.8 × 120 = 96 W) still fits, so no step down.
        let out = l.evaluate(
            &s,
            &with_uncapped(reading(15, 100.0, 120.0 * draw_factor(f0)), 120.0),
        );
        assert_eq!(out.change, None);
        assert_eq!(out.state.step, 1);
        let f1 = out.cap.expect("capped");
        assert!(f1 < f0 && f1 >= 0.6, "{f1} vs {f0}");
        s = out.state;
        // 130 W: even the lowest limit is not enough (104 W), so step on.
        let out = l.evaluate(
            &s,
            &with_uncapped(reading(30, 100.0, 120.0 * draw_factor(f1)), 130.0),
        );
        assert_eq!(out.state.step, 2);
        assert_eq!(out.cap, Some(0.6), "the limit is at its lowest past step 1");
    }

    #[test]
    fn the_power_cap_is_lifted_once_the_uncapped_draw_fits_with_the_band_for_the_dwell() {
        let l = ladder();
        let mut s = LadderState::default();
        let mut steps = vec![];
        // 95 W uncapped: capped, and 95 > 90 keeps it on.
        for now in (0..120).step_by(15) {
            let out = l.evaluate(&s, &with_uncapped(reading(now, 100.0, 101.0), 95.0));
            s = out.state;
            steps.push(s.step);
        }
        assert!(steps.iter().all(|x| *x == 1), "{steps:?}");
        // 89 W uncapped: the limit goes to 100 %, and after the dwell the
        // cap is lifted (an Up change, no reversal).
        let mut caps = vec![];
        for now in (120..240).step_by(15) {
            let out = l.evaluate(&s, &with_uncapped(reading(now, 100.0, 89.0), 89.0));
            caps.push(out.cap);
            s = out.state;
        }
        assert_eq!(caps[0], Some(1.0));
        assert_eq!(s.step, 0);
        assert_eq!(caps.last().copied().flatten(), None);
        assert_eq!(s.last_direction, Some(Direction::Up));
    }

    #[test]
    fn an_oscillating_demand_under_a_continuous_cap_never_reverses_within_the_dwell() {
        let l = ladder();
        let mut s = LadderState::default();
        let mut last: Option<(i64, Direction)> = None;
        let mut limit: Option<f64> = None;
        for i in 0..2000 {
            let now = i * 5;
            let u = 60.0 + 80.0 * (((now / 35) % 7) as f64 / 6.0);
            let capped = u * limit.map_or(1.0, draw_factor);
            let out = l.evaluate(&s, &with_uncapped(reading(now, 100.0, capped), u));
            if let Some(c) = out.change {
                if let Some((t0, d0)) = last {
                    assert!(d0 == c.direction || now - t0 >= 60, "reversed at {now}");
                }
                last = Some((now, c.direction));
            }
            limit = out.cap;
            s = out.state;
        }
    }

    #[test]
    fn allowance_is_supply_less_margin_under_the_ceiling() {
        assert_eq!(allowance(3000.0, 1000.0, 20.0), 800.0);
        assert_eq!(allowance(500.0, 1000.0, 20.0), 500.0);
        assert_eq!(allowance(500.0, -10.0, 20.0), 0.0);
    }

    #[test]
    fn rungs_are_taken_in_order_one_per_evaluation_while_over() {
        let l = ladder();
        // Each rung saves 10 W (the estimates); 30 W over → one at a time
        // would not do, so the ladder takes what the estimates say.
        let steps = run(
            &l,
            &[(0, 100.0, 105.0), (15, 100.0, 105.0), (30, 100.0, 105.0)],
        );
        assert_eq!(steps, vec![1, 2, 3]);
    }

    #[test]
    fn a_large_deficit_takes_several_rungs_at_once_in_order() {
        let l = ladder();
        let out = l.evaluate(&LadderState::default(), &reading(0, 100.0, 125.0));
        let c = out.change.expect("changes");
        assert_eq!((c.from, c.to, c.direction), (0, 3, Direction::Down));
        assert!(l.in_force(3, Rung::PowerCap) && l.in_force(3, Rung::ShedDeferrable));
        assert!(!l.in_force(3, Rung::Defer));
    }

    #[test]
    fn a_step_down_is_given_its_settle_time_before_the_next() {
        let l = ladder().with_settle(Duration::from_secs(20));
        let steps = run(
            &l,
            &[(0, 100.0, 105.0), (15, 100.0, 105.0), (30, 100.0, 105.0)],
        );
        assert_eq!(steps, vec![1, 1, 2]);
    }

    #[test]
    fn disabled_rungs_are_skipped() {
        let l = Ladder::from_policy(&LadderPolicy {
            power_cap: crate::resources::PowerCapPolicy {
                enabled: false,
                ..Default::default()
            },
            shed: vec![SheddablePriority::Deferrable],
            defer: true,
            hysteresis_percent: 10.0,
            dwell: "60s".into(),
        })
        .expect("valid");
        assert_eq!(l.rungs, vec![Rung::ShedDeferrable, Rung::Defer]);
        let steps = run(
            &l,
            &[(0, 100.0, 105.0), (15, 100.0, 105.0), (30, 100.0, 105.0)],
        );
        assert_eq!(steps, vec![2, 4, 4]);
    }

    #[test]
    fn the_ladder_never_goes_past_its_top() {
        let l = ladder();
        let mut s = LadderState {
            step: 4,
            ..Default::default()
        };
        let out = l.evaluate(&s, &reading(0, 10.0, 500.0));
        assert_eq!(out.hold, Some(Hold::AtTop));
        s = out.state;
        assert_eq!(s.step, 4);
    }

    #[test]
    fn climbing_waits_for_headroom_to_hold_for_the_dwell() {
        let l = ladder();
        // Stepped down at 0; headroom after undoing: 100 − (70 + 10) = 20 ≥ 10.
        let steps = run(
            &l,
            &[
                (0, 100.0, 105.0),
                (15, 100.0, 70.0),
                (45, 100.0, 70.0),
                (74, 100.0, 70.0),
                (75, 100.0, 70.0),
            ],
        );
        // Headroom holds from 15; the climb comes at 75 (15 + 60), not before.
        assert_eq!(steps, vec![1, 1, 1, 1, 0]);
    }

    #[test]
    fn headroom_inside_the_hysteresis_band_does_not_climb() {
        let l = ladder();
        // 100 − (85 + 10) = 5 < 10 % of 100: stays.
        let series: Vec<_> = std::iter::once((0, 100.0, 105.0))
            .chain((1..40).map(|i| (i * 15, 100.0, 85.0)))
            .collect();
        assert!(run(&l, &series).iter().all(|s| *s == 1));
    }

    #[test]
    fn a_break_in_headroom_restarts_the_dwell() {
        let l = ladder();
        let steps = run(
            &l,
            &[
                (0, 100.0, 105.0),
                (15, 100.0, 70.0),
                (60, 100.0, 95.0), // headroom gone
                (75, 100.0, 70.0), // holds again from 75
                (120, 100.0, 70.0),
                (134, 100.0, 70.0),
                (135, 100.0, 70.0),
            ],
        );
        assert_eq!(steps, vec![1, 1, 1, 1, 1, 1, 0]);
    }

    #[test]
    fn climbing_back_is_one_rung_per_dwell() {
        let l = ladder();
        let mut s = LadderState::default();
        s = l.evaluate(&s, &reading(0, 100.0, 200.0)).state;
        assert_eq!(s.step, 4);
        let mut changes = vec![];
        for i in 1..200 {
            let out = l.evaluate(&s, &reading(i * 5, 1000.0, 50.0));
            if let Some(c) = out.change {
                changes.push((i * 5, c.from, c.to));
            }
            s = out.state;
        }
        assert_eq!(changes.len(), 4, "{changes:?}");
        for w in changes.windows(2) {
            assert!(w[1].0 - w[0].0 >= 60, "{changes:?}");
            assert_eq!(w[0].2, w[1].1, "one rung at a time: {changes:?}");
        }
        assert_eq!(s.step, 0);
    }

    #[test]
    fn no_step_is_reversed_within_its_dwell() {
        let l = ladder();
        // Climb at 75, then a surge at 80: within the dwell of the climb the
        // ladder holds; after it, it steps down again.
        let mut s = LadderState::default();
        let mut log = vec![];
        for (now, a, d) in [
            (0, 100.0, 105.0),
            (15, 100.0, 70.0),
            (75, 100.0, 70.0),
            (80, 100.0, 130.0),
            (120, 100.0, 130.0),
            (135, 100.0, 130.0),
        ] {
            let out = l.evaluate(&s, &reading(now, a, d));
            log.push((now, out.state.step, out.hold));
            s = out.state;
        }
        assert_eq!(log[2].1, 0, "climbed at 75");
        assert_eq!(log[3], (80, 0, Some(Hold::NoReversalWithinDwell)));
        assert_eq!(log[4].1, 0);
        assert!(log[5].1 > 0, "stepped down once the dwell passed: {log:?}");
    }

    #[test]
    fn an_oscillating_draw_never_reverses_a_step_within_the_dwell() {
        let l = ladder();
        let mut s = LadderState::default();
        let mut last: Option<(i64, Direction)> = None;
        for i in 0..2000 {
            let now = i * 5;
            // Draw swings ±30 % around the allowance every 20 s.
            let draw = if (now / 20) % 2 == 0 { 130.0 } else { 70.0 };
            let out = l.evaluate(&s, &reading(now, 100.0, draw));
            if let Some(c) = out.change {
                if let Some((t0, d0)) = last {
                    assert!(
                        d0 == c.direction || now - t0 >= 60,
                        "reversed at {now} after {d0:?} at {t0}"
                    );
                }
                last = Some((now, c.direction));
            }
            s = out.state;
        }
    }

    #[test]
    fn the_state_carries_over_a_restart() {
        // A new controller reading the persisted state continues the dwell.
        let l = ladder();
        let s = l
            .evaluate(&LadderState::default(), &reading(0, 100.0, 105.0))
            .state;
        let s = l.evaluate(&s, &reading(15, 100.0, 70.0)).state;
        let restored = LadderState {
            step: s.step,
            last_change: s.last_change,
            last_direction: s.last_direction,
            headroom_since: s.headroom_since,
        };
        let out = l.evaluate(&restored, &reading(75, 100.0, 70.0));
        assert_eq!(out.state.step, 0);
    }

    #[test]
    fn fail_safe_supply_decays_to_the_floor_and_is_never_unlimited() {
        let f = FailSafe {
            max_age: Duration::from_secs(60),
            decay: Duration::from_secs(100),
            floor_watts: 200.0,
        };
        let good = Some((1200.0, t(0)));
        assert_eq!(
            f.supply(good, t(30)),
            SupplyEstimate {
                watts: 1200.0,
                stale: false
            }
        );
        let half = f.supply(good, t(110));
        assert!(half.stale && (half.watts - 700.0).abs() < 1e-9, "{half:?}");
        assert_eq!(f.supply(good, t(10_000)).watts, 200.0);
        assert_eq!(
            f.supply(None, t(0)),
            SupplyEstimate {
                watts: 200.0,
                stale: true
            }
        );
        // A last reading under the floor is kept, not raised to the floor.
        assert_eq!(f.supply(Some((50.0, t(0))), t(500)).watts, 50.0);
    }

    #[test]
    fn stale_supply_makes_the_ladder_step_down_toward_the_floor() {
        let l = ladder();
        let f = FailSafe {
            max_age: Duration::from_secs(60),
            decay: Duration::from_secs(60),
            floor_watts: 100.0,
        };
        let good = Some((1000.0, t(0)));
        let mut s = LadderState::default();
        let mut steps = vec![];
        for now in (0..300).step_by(15) {
            let a = allowance(10_000.0, f.supply(good, t(now)).watts, 20.0);
            s = l.evaluate(&s, &reading(now, a, 500.0)).state;
            steps.push(s.step);
        }
        assert_eq!(steps[0], 0);
        assert_eq!(*steps.last().expect("steps"), 4, "{steps:?}");
    }

    #[test]
    fn retry_after_follows_the_schedule_and_the_dwell() {
        use crate::resources::{SchedulePoint, ScheduleSupply};
        let spec = ScheduleSupply {
            time_zone: "UTC".into(),
            points: vec![
                SchedulePoint {
                    time: "06:00".into(),
                    watts: 0.0,
                },
                SchedulePoint {
                    time: "12:00".into(),
                    watts: 1000.0,
                },
                SchedulePoint {
                    time: "18:00".into(),
                    watts: 0.0,
                },
            ],
            months: vec![],
        };
        let sched = Schedule::new(&spec).expect("valid");
        let l = ladder();
        let now: Timestamp = "2025-03-01T20:00:00Z".parse().expect("ts");
        let state = LadderState {
            step: 4,
            last_change: Some(now),
            ..Default::default()
        };
        // Allowance 0.8 × w × 0.9 ≥ 360 → w ≥ 500 → 09:00, plus 60 s dwell.
        let s = l.retry_after(&state, now, 360.0, Some((&sched, 10_000.0, 20.0)));
        assert_eq!(s, 13 * 3600 + 60);
        // Without a schedule: the dwell.
        assert_eq!(l.retry_after(&state, now, 360.0, None), 60);
    }

    #[test]
    fn essential_is_never_shed_and_standard_only_after_deferrable() {
        use crate::resources::Priority;
        let l = ladder();
        let md = |k: &str, p, r, m| Sheddable {
            key: k.into(),
            priority: p,
            replicas: r,
            min_replicas: m,
        };
        let mds = vec![
            md("a/defer", Priority::Deferrable, 3, 1),
            md("a/std", Priority::Standard, 2, 0),
            md("a/ess", Priority::Essential, 4, 1),
            md("a/at-min", Priority::Deferrable, 1, 1),
        ];
        assert!(shed_plan(&l, 1, &mds).is_empty());
        assert_eq!(shed_plan(&l, 2, &mds), vec![("a/defer".to_string(), 1)]);
        assert_eq!(
            shed_plan(&l, 4, &mds),
            vec![("a/defer".to_string(), 1), ("a/std".to_string(), 0)]
        );
    }

    #[test]
    fn energy_today_restarts_at_local_midnight() {
        let tz = crate::resources::time::time_zone("UTC").expect("tz");
        let a: Timestamp = "2025-03-01T23:59:00Z".parse().expect("ts");
        let b: Timestamp = "2025-03-02T00:00:00Z".parse().expect("ts");
        let e = EnergyToday {
            energy_wh: 100.0,
            renewable_wh: 50.0,
        };
        let (e2, j) = e.advance(Some(a), b, 600.0, 300.0, tz, Duration::from_secs(600));
        assert_eq!(j, 36_000.0);
        assert_eq!(
            e2,
            EnergyToday {
                energy_wh: 10.0,
                renewable_wh: 5.0
            }
        );
    }
}
