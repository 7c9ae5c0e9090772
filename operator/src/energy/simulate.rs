//! `copyhold simulate budget`: run the `budget` module over a day of supply
//! and demand traces with a simple plant, beside two baselines.
//!
//! The plant: the cluster would draw the demand trace; its draw is split
//! by priority (`--essential-share`, `--standard-share`, the rest
//! deferrable). The ladder's rungs act on it as the controller's do:
//! power capping at a limit leaves [`draw_factor`] of the draw (the limit
//! is the ladder's own: set each evaluation between `minPercent` and 100 %
//! of rated power to fill the allowance less the hysteresis band), shedding a priority
//! leaves `--min-fraction` of its draw (its `minReplicas`), deferring cuts
//! [`DEFER_SAVING`] of what deferrable work still draws, and those joules
//! count as deferred requests (`--joules-per-request`). Each evaluation
//! reads the draw under the step in force, decides, and the interval up to
//! the next evaluation runs under the decided step. The rungs' savings and
//! restore estimates given to the ladder are the plant's own.
//!
//! Baselines: `no_ladder` draws the demand; `static_cap` draws the demand
//! capped at the day's mean supply.
//!
//! The floor: what the deepest step draws at the lowest power limit
//! (essential models at full, the others at their minReplicas, deferring in
//! force, the cap at `minPercent`). When the floor exceeds the allowance (a
//! winter night on a nearly empty battery) no ladder can stay within it, so
//! the report also gives the share of time the floor allowed it, the share
//! within the allowance during that time, and the energy over the allowance
//! beyond what the floor itself draws over it.

use std::path::Path;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use serde::Serialize;

use crate::energy::budget::{
    self, DEFER_SAVING, Direction, Ladder, LadderState, Reading, Rung, RungWatts, draw_factor,
};
use crate::resources::EnergyBudget;
use crate::resources::time::elapsed;

/// Why a simulation cannot run.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Csv {
        path: String,
        line: usize,
        message: String,
    },
    #[error("{path}: not an EnergyBudget: {message}")]
    Budget { path: String, message: String },
    #[error("{0}")]
    Input(String),
}

/// One sample of a trace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub time: Timestamp,
    pub watts: f64,
}

/// Parse a `time,watts` CSV (RFC 3339 times, strictly increasing).
pub fn parse_csv(path: &str, text: &str) -> Result<Vec<Sample>, SimError> {
    let err = |line: usize, message: String| SimError::Csv {
        path: path.into(),
        line,
        message,
    };
    let mut lines = text.lines().enumerate();
    let header = lines
        .by_ref()
        .find(|(_, l)| !l.trim().is_empty())
        .ok_or_else(|| err(1, "empty file: expected a `time,watts` header".into()))?;
    let h = header.1.trim().trim_start_matches('\u{feff}');
    if h.replace(' ', "") != "time,watts" {
        return Err(err(
            header.0 + 1,
            format!("header is {h:?}, expected `time,watts`"),
        ));
    }
    let mut out: Vec<Sample> = Vec::new();
    for (i, l) in lines {
        let n = i + 1;
        let l = l.trim();
        if l.is_empty() {
            continue;
        }
        let mut fields = l.split(',');
        let (Some(t), Some(w), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err(err(
                n,
                format!("expected two fields `time,watts`, got {l:?}"),
            ));
        };
        let time: Timestamp = t
            .trim()
            .parse()
            .map_err(|e| err(n, format!("{:?} is not an RFC 3339 time: {e}", t.trim())))?;
        let watts: f64 = w
            .trim()
            .parse()
            .map_err(|_| err(n, format!("{:?} is not a number of watts", w.trim())))?;
        if !(watts.is_finite() && watts >= 0.0) {
            return Err(err(n, format!("{watts} W: watts must be finite and >= 0")));
        }
        if out.last().is_some_and(|p| time <= p.time) {
            return Err(err(n, format!("{time} is not after the previous sample")));
        }
        out.push(Sample { time, watts });
    }
    if out.len() < 2 {
        return Err(err(1, "at least two samples are needed".into()));
    }
    Ok(out)
}

/// Read a CSV trace file.
pub fn read_csv(path: &Path) -> Result<Vec<Sample>, SimError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| SimError::Io {
        path: p.clone(),
        source,
    })?;
    parse_csv(&p, &text)
}

/// Read an EnergyBudget manifest.
pub fn read_budget(path: &Path) -> Result<EnergyBudget, SimError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| SimError::Io {
        path: p.clone(),
        source,
    })?;
    serde_saphyr::from_str(&text).map_err(|e| SimError::Budget {
        path: p,
        message: e.to_string(),
    })
}

/// Linear interpolation of a trace at `t` (clamped at its ends).
fn at(trace: &[Sample], t: Timestamp) -> f64 {
    let i = trace.partition_point(|s| s.time <= t);
    if i == 0 {
        return trace[0].watts;
    }
    if i >= trace.len() {
        return trace[trace.len() - 1].watts;
    }
    let (a, b) = (trace[i - 1], trace[i]);
    let span = b.time.duration_since(a.time).as_millis() as f64;
    let into = t.duration_since(a.time).as_millis() as f64;
    a.watts + (b.watts - a.watts) * (into / span)
}

/// The plant's shape.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Plant {
    pub essential_share: f64,
    pub standard_share: f64,
    /// Share of a shed priority's draw its minReplicas keep.
    pub min_fraction: f64,
    pub joules_per_request: f64,
}

impl Default for Plant {
    fn default() -> Self {
        Self {
            essential_share: 0.25,
            standard_share: 0.35,
            min_fraction: 0.25,
            joules_per_request: 500.0,
        }
    }
}

impl Plant {
    /// (draw, watts of deferred work) under `step` for `demand`.
    fn draw(&self, ladder: &Ladder, cap: f64, step: u8, demand: f64) -> (f64, f64) {
        let e = demand * self.essential_share;
        let mut s = demand * self.standard_share;
        let mut d = demand * (1.0 - self.essential_share - self.standard_share).max(0.0);
        if ladder.in_force(step, Rung::ShedDeferrable) {
            d *= self.min_fraction;
        }
        if ladder.in_force(step, Rung::ShedStandard) {
            s *= self.min_fraction;
        }
        let mut deferred = 0.0;
        if ladder.in_force(step, Rung::Defer) {
            deferred = d * DEFER_SAVING;
            d -= deferred;
        }
        let f = if ladder.in_force(step, Rung::PowerCap) {
            cap
        } else {
            1.0
        };
        ((e + s + d) * f, deferred * f)
    }
}

/// The figures of one strategy.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Figures {
    pub within_allowance_pct: f64,
    pub renewable_used_wh: f64,
    pub renewable_available_wh: f64,
    pub over_allowance_wh: f64,
    /// Share of the steps whose floor was within the allowance during which
    /// the draw was too; `None` when the floor never was.
    pub within_allowance_when_feasible_pct: Option<f64>,
    /// Energy over the allowance beyond what the floor draws over it:
    /// ∫ (draw − max(allowance, floor))⁺, the part a ladder could avoid.
    pub over_allowance_beyond_floor_wh: f64,
    pub requests_deferred: u64,
    pub transitions: u64,
    pub reversals_within_dwell: u64,
    /// Changes of the power limit within a step (not step transitions).
    pub power_limit_changes: u64,
}

/// Both baselines.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Baselines {
    pub no_ladder: Figures,
    /// Capped at the day's mean supply.
    pub static_cap: Figures,
    /// Capped at the day's mean supply less the budget's margin (the mean
    /// allowance): a static cap that keeps the same slack as the ladder.
    pub static_cap_with_margin: Figures,
}

/// The whole result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    #[serde(flatten)]
    pub ladder: Figures,
    pub baselines: Baselines,
    pub budget: String,
    pub steps: usize,
    /// Share of the time the floor was within the allowance: when staying
    /// within it was possible at all.
    pub feasible_pct: f64,
    /// The floor's own energy over the allowance: ∫ (floor − allowance)⁺,
    /// what any strategy that keeps the floor draws over it.
    pub floor_over_allowance_wh: f64,
    pub step_seconds: f64,
    pub static_cap_watts: f64,
    pub static_cap_with_margin_watts: f64,
    pub plant: Plant,
}

/// One evaluation interval as every strategy sees it.
struct Interval {
    supply: f64,
    allowance: f64,
    /// What the deepest step draws at the lowest power limit.
    floor: f64,
    hours: f64,
}

impl Interval {
    /// Whether staying within the allowance was possible at all.
    fn feasible(&self) -> bool {
        self.floor <= self.allowance + 1e-6
    }
}

#[derive(Default)]
struct Acc {
    within: usize,
    n: usize,
    feasible: usize,
    within_feasible: usize,
    used_wh: f64,
    avail_wh: f64,
    over_wh: f64,
    beyond_floor_wh: f64,
    floor_over_wh: f64,
    deferred_j: f64,
}

/// `part` of `whole` in percent, to two decimals.
fn pct(part: usize, whole: usize) -> f64 {
    (part as f64 * 100.0 / whole as f64 * 100.0).round() / 100.0
}

impl Acc {
    fn add(&mut self, draw: f64, deferred_w: f64, i: &Interval) {
        self.n += 1;
        let within = draw <= i.allowance + 1e-6;
        if within {
            self.within += 1;
        }
        if i.feasible() {
            self.feasible += 1;
            if within {
                self.within_feasible += 1;
            }
        }
        self.used_wh += draw.min(i.supply) * i.hours;
        self.avail_wh += i.supply * i.hours;
        self.over_wh += (draw - i.allowance).max(0.0) * i.hours;
        self.beyond_floor_wh += (draw - i.allowance.max(i.floor)).max(0.0) * i.hours;
        self.floor_over_wh += (i.floor - i.allowance).max(0.0) * i.hours;
        self.deferred_j += deferred_w * i.hours * 3600.0;
    }

    fn figures(&self, plant: &Plant) -> Figures {
        Figures {
            within_allowance_pct: if self.n == 0 {
                100.0
            } else {
                pct(self.within, self.n)
            },
            renewable_used_wh: r1(self.used_wh),
            renewable_available_wh: r1(self.avail_wh),
            over_allowance_wh: r1(self.over_wh),
            within_allowance_when_feasible_pct: (self.feasible > 0)
                .then(|| pct(self.within_feasible, self.feasible)),
            over_allowance_beyond_floor_wh: r1(self.beyond_floor_wh),
            requests_deferred: (self.deferred_j / plant.joules_per_request.max(1e-9)).round()
                as u64,
            transitions: 0,
            reversals_within_dwell: 0,
            power_limit_changes: 0,
        }
    }
}

/// Rounded to a tenth.
fn r1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Run the ladder and the baselines over the overlap of the two traces.
pub fn simulate(
    eb: &EnergyBudget,
    supply: &[Sample],
    demand: &[Sample],
    step: Duration,
    plant: Plant,
) -> Result<Report, SimError> {
    let spec = &eb.spec;
    if step.is_zero() {
        return Err(SimError::Input("--step must be positive".into()));
    }
    let (Some(s0), Some(d0), Some(s1), Some(d1)) =
        (supply.first(), demand.first(), supply.last(), demand.last())
    else {
        return Err(SimError::Input("empty trace".into()));
    };
    let start = s0.time.max(d0.time);
    let end = s1.time.min(d1.time);
    if end <= start {
        return Err(SimError::Input(
            "the supply and demand traces do not overlap in time".into(),
        ));
    }
    let ladder = Ladder::from_policy(&spec.policy).map_err(SimError::Input)?;
    let min_cap = draw_factor(ladder.min_cap);
    let deepest = ladder.rungs.last().map_or(0, |r| r.step());
    let dt = SignedDuration::try_from(step).map_err(|e| SimError::Input(e.to_string()))?;
    let hours = step.as_secs_f64() / 3600.0;
    let mut times = Vec::new();
    let mut t = start;
    while t < end {
        times.push(t);
        t += dt;
    }
    let mean_supply = times.iter().map(|t| at(supply, *t)).sum::<f64>() / times.len() as f64;
    let static_cap = mean_supply.min(spec.ceiling_watts);
    let static_margin = budget::allowance(spec.ceiling_watts, mean_supply, spec.margin_percent);

    let (mut lad, mut none, mut capped) = (Acc::default(), Acc::default(), Acc::default());
    let mut capped_margin = Acc::default();
    let mut state = LadderState::default();
    let mut transitions = 0u64;
    let mut reversals = 0u64;
    let mut last_change: Option<(Timestamp, Direction)> = None;
    // The power limit in force (fraction of rated power), and its changes
    // within a step.
    let mut limit: Option<f64> = None;
    let mut limit_changes = 0u64;
    for &now in &times {
        let s = at(supply, now);
        let d = at(demand, now);
        let allowance = budget::allowance(spec.ceiling_watts, s, spec.margin_percent);
        let interval = Interval {
            supply: s,
            allowance,
            floor: plant.draw(&ladder, min_cap, deepest, d).0,
            hours,
        };
        // The draw the controller would read under the step in force.
        let current = ladder.top(state.step).map_or(0, Rung::step);
        let in_force = draw_factor(limit.unwrap_or(ladder.min_cap));
        let (draw_now, _) = plant.draw(&ladder, in_force, current, d);
        let (uncapped, _) = plant.draw(&ladder, 1.0, current, d);
        let mut savings = RungWatts::default();
        let mut prev = plant.draw(&ladder, min_cap, current, d).0;
        for r in ladder.rungs.iter().copied().filter(|r| r.step() > current) {
            let (w, _) = plant.draw(&ladder, min_cap, r.step(), d);
            savings.set(r, (prev - w).max(0.0));
            prev = w;
        }
        let mut restore = RungWatts::default();
        if let Some(top) = ladder.top(current) {
            let below = ladder
                .rungs
                .iter()
                .copied()
                .rfind(|r| r.step() < top.step())
                .map_or(0, Rung::step);
            // In uncapped watts (the ladder is given the uncapped draw).
            let (w, _) = plant.draw(&ladder, 1.0, below, d);
            restore.set(top, (w - uncapped).max(0.0));
        }
        let out = ladder.evaluate(
            &state,
            &Reading {
                now,
                allowance,
                draw: draw_now,
                savings,
                restore,
                uncapped: Some(uncapped),
            },
        );
        if let Some(c) = out.change {
            transitions += 1;
            if let Some((t0, d0)) = last_change
                && d0 != c.direction
                && elapsed(t0, now) < ladder.dwell
            {
                reversals += 1;
            }
            last_change = Some((now, c.direction));
        }
        if out.change.is_none() && limit.is_some() && out.cap.is_some() && out.cap != limit {
            limit_changes += 1;
        }
        limit = out.cap;
        state = out.state;
        let (draw, deferred) =
            plant.draw(&ladder, draw_factor(limit.unwrap_or(1.0)), state.step, d);
        lad.add(draw, deferred, &interval);
        none.add(d, 0.0, &interval);
        let c = d.min(static_cap);
        capped.add(c, d - c, &interval);
        let c = d.min(static_margin);
        capped_margin.add(c, d - c, &interval);
    }
    let mut ladder_figures = lad.figures(&plant);
    ladder_figures.transitions = transitions;
    ladder_figures.reversals_within_dwell = reversals;
    ladder_figures.power_limit_changes = limit_changes;
    Ok(Report {
        ladder: ladder_figures,
        baselines: Baselines {
            no_ladder: none.figures(&plant),
            static_cap: capped.figures(&plant),
            static_cap_with_margin: capped_margin.figures(&plant),
        },
        budget: eb.metadata.name.clone().unwrap_or_default(),
        steps: times.len(),
        feasible_pct: pct(lad.feasible, lad.n),
        floor_over_allowance_wh: r1(lad.floor_over_wh),
        step_seconds: step.as_secs_f64(),
        static_cap_watts: (static_cap * 10.0).round() / 10.0,
        static_cap_with_margin_watts: (static_margin * 10.0).round() / 10.0,
        plant,
    })
}

/// The side-by-side table.
pub fn table(r: &Report) -> String {
    type Row = (&'static str, fn(&Figures) -> String);
    let rows: [Row; 10] = [
        ("time within allowance (%)", |f| {
            format!("{:.2}", f.within_allowance_pct)
        }),
        ("… within allowance when the floor allowed (%)", |f| {
            f.within_allowance_when_feasible_pct
                .map_or("n/a".into(), |p| format!("{p:.2}"))
        }),
        ("renewable energy used (Wh)", |f| {
            format!("{:.0}", f.renewable_used_wh)
        }),
        ("renewable energy available (Wh)", |f| {
            format!("{:.0}", f.renewable_available_wh)
        }),
        ("energy over allowance (Wh)", |f| {
            format!("{:.0}", f.over_allowance_wh)
        }),
        ("energy over allowance beyond the floor's (Wh)", |f| {
            format!("{:.0}", f.over_allowance_beyond_floor_wh)
        }),
        ("requests deferred", |f| f.requests_deferred.to_string()),
        ("step transitions", |f| f.transitions.to_string()),
        ("reversals within dwell", |f| {
            f.reversals_within_dwell.to_string()
        }),
        ("power limit changes within a step", |f| {
            f.power_limit_changes.to_string()
        }),
    ];
    let mut out = format!(
        "copyhold simulate budget: {} ({} steps of {} s; static cap {:.0} W, with margin {:.0} W)\n",
        r.budget, r.steps, r.step_seconds, r.static_cap_watts, r.static_cap_with_margin_watts
    );
    out += &format!(
        "time the floor allowed staying within (%): {:.2}; floor's energy over allowance (Wh): {:.0}\n",
        r.feasible_pct, r.floor_over_allowance_wh
    );
    out += &format!(
        "{:<46} {:>12} {:>12} {:>12} {:>14}\n",
        "", "ladder", "no ladder", "static cap", "cap w/ margin"
    );
    for (name, f) in rows {
        out += &format!(
            "{:<46} {:>12} {:>12} {:>12} {:>14}\n",
            name,
            f(&r.ladder),
            f(&r.baselines.no_ladder),
            f(&r.baselines.static_cap),
            f(&r.baselines.static_cap_with_margin)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_csv_line_is_named_with_its_number() {
        let e = parse_csv(
            "s.csv",
            "time,watts\n2025-06-01T00:00:00Z,10\n2025-06-01T00:01:00Z,ten\n",
        )
        .expect_err("bad");
        assert_eq!(e.to_string(), "s.csv:3: \"ten\" is not a number of watts");
        let e = parse_csv("s.csv", "when,w\n").expect_err("bad header");
        assert!(e.to_string().starts_with("s.csv:1:"), "{e}");
        let e = parse_csv(
            "s.csv",
            "time,watts\n2025-06-01T00:01:00Z,1\n2025-06-01T00:00:00Z,1\n",
        )
        .expect_err("order");
        assert!(e.to_string().starts_with("s.csv:3:"), "{e}");
        let e = parse_csv("s.csv", "time,watts\nyesterday,1\n").expect_err("time");
        assert!(e.to_string().contains("RFC 3339"), "{e}");
        let e = parse_csv(
            "s.csv",
            "time,watts\n2025-06-01T00:00:00Z,-1\n2025-06-01T00:01:00Z,1\n",
        )
        .expect_err("negative");
        assert!(e.to_string().starts_with("s.csv:2:"), "{e}");
    }

    /// A budget like the example's: margin 20 %, power cap to 60 %, shed
    /// deferrable then standard, defer.
    fn example_budget() -> EnergyBudget {
        serde_saphyr::from_str(
            "apiVersion: copyhold.dev/v1alpha1
kind: EnergyBudget
metadata: {name: hard-night}
spec:
  ceilingWatts: 3000
  marginPercent: 20
  supply: {schedule: {timeZone: UTC, points: [{time: \"00:00\", watts: 400}]}}
  policy:
    powerCap: {enabled: true, minPercent: 60}
    shed: [deferrable, standard]
    defer: true
    hysteresisPercent: 10
    dwell: 5m
",
        )
        .expect("a valid EnergyBudget")
    }

    fn trace(points: &[(&str, f64)]) -> Vec<Sample> {
        points
            .iter()
            .map(|(t, w)| Sample {
                time: t.parse().expect("ts"),
                watts: *w,
            })
            .collect()
    }

    /// 800 W of demand for two hours. The first hour the supply is 200 W
    /// (allowance 160 W), below the floor: essential 200 W, standard and
    /// deferrable at minReplicas 70 + 80 W, deferring halves the latter to
    /// 40 W, and the deepest cap (60 %) leaves 0.8 of it: 248 W. The second
    /// hour the supply is 3000 W (allowance 2400 W). Only the second hour
    /// could be within the allowance; the ladder's share is judged there.
    #[test]
    fn time_when_the_floor_exceeds_the_allowance_is_not_counted_against_the_ladder() {
        let supply = trace(&[
            ("2025-12-21T00:00:00Z", 200.0),
            ("2025-12-21T00:59:00Z", 200.0),
            ("2025-12-21T01:00:00Z", 3000.0),
            ("2025-12-21T02:00:00Z", 3000.0),
        ]);
        let demand = trace(&[
            ("2025-12-21T00:00:00Z", 800.0),
            ("2025-12-21T02:00:00Z", 800.0),
        ]);
        let r = simulate(
            &example_budget(),
            &supply,
            &demand,
            Duration::from_secs(60),
            Plant::default(),
        )
        .expect("simulates");
        assert_eq!(r.steps, 120);
        assert_eq!(r.feasible_pct, 50.0, "{r:?}");
        // (248 − 160) W for an hour.
        assert_eq!(r.floor_over_allowance_wh, 88.0, "{r:?}");
        // Over the whole day the ladder was over for the infeasible hour...
        assert!(r.ladder.within_allowance_pct <= 50.0, "{r:?}");
        // ...but during the feasible hour it stayed within.
        assert_eq!(
            r.ladder.within_allowance_when_feasible_pct,
            Some(100.0),
            "{r:?}"
        );
        assert_eq!(
            r.baselines.no_ladder.within_allowance_when_feasible_pct,
            Some(100.0)
        );
        // No strategy that keeps the floor can be over by less than it.
        assert!(
            r.ladder.over_allowance_wh >= r.floor_over_allowance_wh,
            "{r:?}"
        );
        // What it drew over beyond the floor's is never negative.
        assert!(r.ladder.over_allowance_beyond_floor_wh >= 0.0, "{r:?}");
        // No ladder: 800 W against max(160, 248) W for an hour.
        assert_eq!(r.baselines.no_ladder.over_allowance_beyond_floor_wh, 552.0);
        let table = table(&r);
        for row in [
            "time the floor allowed staying within (%)",
            "… within allowance when the floor allowed (%)",
            "floor's energy over allowance (Wh)",
            "energy over allowance beyond the floor's (Wh)",
        ] {
            assert!(table.contains(row), "{row} missing:\n{table}");
        }
    }

    #[test]
    fn a_day_the_floor_never_allows_has_no_feasible_share() {
        let supply = trace(&[
            ("2025-12-21T00:00:00Z", 100.0),
            ("2025-12-21T01:00:00Z", 100.0),
        ]);
        let demand = trace(&[
            ("2025-12-21T00:00:00Z", 800.0),
            ("2025-12-21T01:00:00Z", 800.0),
        ]);
        let r = simulate(
            &example_budget(),
            &supply,
            &demand,
            Duration::from_secs(60),
            Plant::default(),
        )
        .expect("simulates");
        assert_eq!(r.feasible_pct, 0.0);
        assert_eq!(r.ladder.within_allowance_when_feasible_pct, None);
        assert!(table(&r).contains("n/a"), "{}", table(&r));
    }

    #[test]
    fn interpolation_is_linear_between_samples() {
        let s = parse_csv(
            "s",
            "time,watts\n2025-06-01T00:00:00Z,0\n2025-06-01T00:10:00Z,100\n",
        )
        .expect("valid");
        let t: Timestamp = "2025-06-01T00:05:00Z".parse().expect("ts");
        assert_eq!(at(&s, t), 50.0);
    }
}
