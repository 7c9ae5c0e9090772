//! The autoscaler's decision, pure: from the requests in flight (and held
//! for a replica) that the gateway replicas publish, the replica bounds of
//! `spec.autoscaling`, the recommendations of the last stabilisation window
//! and the energy budget's cap, how many replicas to run and why.
//!
//! - recommendation = ceil(in-flight ÷ targetInFlightPerReplica), between
//!   the floor and maxReplicas;
//! - the floor is minReplicas; with minReplicas 0 it is one replica once
//!   the model has served (a model at zero stays there until a request is
//!   held for it), and zero after `scaleToZeroAfter` without requests;
//! - scaling up is at once, scaling down waits: the replicas run are the
//!   highest recommendation of the last `scaleDownStabilization` (the HPA's
//!   `stabilizationWindowSeconds`);
//! - the energy ladder's shed-to cap wins over all of it (it is never below
//!   minReplicas: the ladder does not shed below it).
//!
//! The clock is the caller's (`Instant`s of the controller's own process),
//! so the tests drive it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::resources::model_deployment::Autoscaling;
use crate::resources::{DurationError, parse_duration};

/// Label of the Leases in which each gateway replica publishes, per
/// namespace, the requests it has in flight and held per model.
pub const DEMAND_LABEL: &str = "copyhold.dev/gateway-demand";
/// Annotation of those Leases: JSON, ModelDeployment name → [`ModelDemand`].
pub const DEMAND_ANNOTATION: &str = "copyhold.dev/demand";
/// A gateway rewrites its Lease at least this often while any count is not
/// zero (and at once when a count changes).
pub const DEMAND_HEARTBEAT: Duration = Duration::from_secs(2);
/// A Lease whose resourceVersion has not moved for this long, as the
/// controller's watch saw it, is a dead gateway's and is not counted.
pub const DEMAND_TTL: Duration = Duration::from_secs(10);

/// One gateway replica's requests for one model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelDemand {
    /// Admitted and not yet answered (held ones included).
    pub in_flight: i64,
    /// Waiting for a ready replica.
    pub held: i64,
}

/// The annotation's content: ModelDeployment name → its demand.
pub type PublishedDemand = std::collections::BTreeMap<String, ModelDemand>;

/// `spec.autoscaling`, with its durations parsed.
#[derive(Clone, Debug, PartialEq)]
pub struct Bounds {
    pub min: i32,
    pub max: i32,
    pub target: i32,
    pub window: Duration,
    pub to_zero_after: Option<Duration>,
    pub from_zero_timeout: Duration,
}

impl Bounds {
    /// The bounds of `a`; a malformed duration is refused (validation
    /// reports it on the object before this is reached).
    pub fn of(a: &Autoscaling) -> Result<Bounds, DurationError> {
        Ok(Bounds {
            min: a.min_replicas.max(0),
            max: a.max_replicas.max(a.min_replicas).max(1),
            target: a.target_in_flight_per_replica.max(1),
            window: parse_duration(&a.scale_down_stabilization)?,
            to_zero_after: a
                .scale_to_zero_after
                .as_deref()
                .map(parse_duration)
                .transpose()?,
            from_zero_timeout: parse_duration(&a.scale_from_zero_timeout)?,
        })
    }
}

/// What the controller saw of the model's load.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Observed {
    /// Requests in flight or held, summed over the live gateway replicas.
    pub demand: i64,
    /// Of those, requests held while no replica is ready.
    pub held: i64,
    /// Replicas the Deployment runs now.
    pub current: i32,
    /// How long the demand has been zero, as the controller saw it.
    pub idle_for: Duration,
}

/// An energy budget's cap on the replicas (its shed-to).
#[derive(Clone, Debug, PartialEq)]
pub struct Cap {
    pub replicas: i32,
    pub budget: String,
}

/// The recommendations of the last window, newest last.
#[derive(Clone, Debug, Default)]
pub struct History {
    recs: VecDeque<(Instant, i32)>,
}

impl History {
    /// A history that holds `current` as of `now`: a controller that
    /// starts (or meets a model for the first time) scales nothing down
    /// before a whole window has passed.
    pub fn seeded(now: Instant, current: i32) -> Self {
        History {
            recs: VecDeque::from([(now, current.max(0))]),
        }
    }

    /// Add `rec` at `now`, forget what left the window, and return the
    /// highest recommendation within it.
    fn stabilize(&mut self, now: Instant, rec: i32, window: Duration) -> i32 {
        self.recs.push_back((now, rec));
        while let Some(&(t, _)) = self.recs.front() {
            if now.saturating_duration_since(t) > window && self.recs.len() > 1 {
                self.recs.pop_front();
            } else {
                break;
            }
        }
        self.recs.iter().map(|&(_, r)| r).max().unwrap_or(rec)
    }
}

/// Why the autoscaler decided what it did (the status's and Events'
/// reason word).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// ceil(in-flight ÷ target) replicas.
    Demand,
    /// Requests are held for a model at zero: one replica at least.
    Woken,
    /// Demand fell, but a higher recommendation lies within the window.
    Stabilizing,
    /// Demand would need more than maxReplicas.
    AtMaximum,
    /// Demand needs fewer than the floor.
    AtMinimum,
    /// No request within `scaleToZeroAfter`, or none since the model was
    /// put at zero.
    IdleAtZero,
    /// The energy budget's shed-to cap is below the recommendation.
    CappedByEnergyBudget,
}

impl Why {
    pub fn as_str(self) -> &'static str {
        match self {
            Why::Demand => "Demand",
            Why::Woken => "Woken",
            Why::Stabilizing => "Stabilizing",
            Why::AtMaximum => "AtMaximum",
            Why::AtMinimum => "AtMinimum",
            Why::IdleAtZero => "IdleAtZero",
            Why::CappedByEnergyBudget => "CappedByEnergyBudget",
        }
    }
}

/// The decision: replicas to run, what demand alone asked for, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub desired: i32,
    /// The stabilised recommendation before the energy cap.
    pub recommended: i32,
    pub why: Why,
    pub message: String,
    /// The cap that lowered the recommendation, if one did.
    pub capped_by: Option<Cap>,
}

impl Decision {
    /// `Why: message`, for `status.scaleReason`.
    pub fn reason_line(&self) -> String {
        format!("{}: {}", self.why.as_str(), self.message)
    }
}

/// ceil(demand ÷ target), saturating at i32::MAX.
fn by_demand(demand: i64, target: i32) -> i32 {
    let t = i64::from(target.max(1));
    let n = (demand.max(0) + t - 1) / t;
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// The fewest replicas demand alone may bring the model to (see the module
/// doc), and whether it is zero because the model is idle.
fn floor(b: &Bounds, o: &Observed) -> (i32, bool) {
    if b.min > 0 {
        return (b.min, false);
    }
    if o.demand > 0 {
        return (1, false);
    }
    let idle_long = b.to_zero_after.is_some_and(|after| o.idle_for >= after);
    if idle_long || o.current == 0 {
        (0, true)
    } else {
        (1, false)
    }
}

/// Decide the replicas of one model at `now`, recording the recommendation
/// in `history`.
pub fn decide(
    b: &Bounds,
    o: &Observed,
    cap: Option<&Cap>,
    history: &mut History,
    now: Instant,
) -> Decision {
    let raw = by_demand(o.demand, b.target);
    let (low, idle) = floor(b, o);
    let rec = raw.max(low).min(b.max);
    let stabilized = history.stabilize(now, rec, b.window);
    let (mut why, mut message) = if stabilized > rec {
        (
            Why::Stabilizing,
            format!(
                "{} in flight asks for {rec}; keeping {stabilized} within the {} s scale-down window",
                o.demand,
                b.window.as_secs()
            ),
        )
    } else if raw > b.max {
        (
            Why::AtMaximum,
            format!(
                "{} in flight would need {raw} replicas; maxReplicas is {}",
                o.demand, b.max
            ),
        )
    } else if o.held > 0 && o.current == 0 {
        (
            Why::Woken,
            format!(
                "{} request(s) held for a model at zero; {rec} replica(s)",
                o.held
            ),
        )
    } else if rec == 0 && idle {
        (
            Why::IdleAtZero,
            match b.to_zero_after {
                Some(after) if o.current > 0 || o.idle_for >= after => format!(
                    "no request for {} s (scaleToZeroAfter {} s)",
                    o.idle_for.as_secs(),
                    after.as_secs()
                ),
                _ => "at zero until a request arrives".to_string(),
            },
        )
    } else if raw < low {
        (
            Why::AtMinimum,
            format!(
                "{} in flight needs {raw}; the floor is {low} replica(s)",
                o.demand
            ),
        )
    } else {
        (
            Why::Demand,
            format!(
                "{} in flight ÷ {} per replica = {rec} replica(s)",
                o.demand, b.target
            ),
        )
    };
    let mut desired = stabilized;
    let mut capped_by = None;
    if let Some(c) = cap {
        let limit = c.replicas.max(b.min);
        if limit < stabilized {
            desired = limit;
            capped_by = Some(Cap {
                replicas: limit,
                budget: c.budget.clone(),
            });
            message = format!(
                "EnergyBudget {} caps the replicas at {limit}; {message}",
                c.budget
            );
            why = Why::CappedByEnergyBudget;
        }
    }
    Decision {
        desired,
        recommended: stabilized,
        why,
        message,
        capped_by,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bounds(min: i32, max: i32, target: i32, window_s: u64) -> Bounds {
        Bounds {
            min,
            max,
            target,
            window: Duration::from_secs(window_s),
            to_zero_after: None,
            from_zero_timeout: Duration::from_secs(120),
        }
    }

    fn seen(demand: i64, current: i32) -> Observed {
        Observed {
            demand,
            held: 0,
            current,
            idle_for: Duration::ZERO,
        }
    }

    #[test]
    fn replicas_are_in_flight_divided_by_the_target_rounded_up() {
        let b = bounds(1, 10, 4, 300);
        let t0 = Instant::now();
        let mut h = History::seeded(t0, 1);
        let d = decide(&b, &seen(9, 1), None, &mut h, t0);
        assert_eq!((d.desired, d.why), (3, Why::Demand));
        assert!(d.message.contains("9 in flight"), "{}", d.message);
    }

    #[test]
    fn demand_above_the_maximum_runs_the_maximum() {
        let b = bounds(1, 3, 2, 300);
        let t0 = Instant::now();
        let d = decide(&b, &seen(100, 1), None, &mut History::seeded(t0, 1), t0);
        assert_eq!((d.desired, d.why), (3, Why::AtMaximum));
    }

    #[test]
    fn scaling_down_waits_for_the_stabilisation_window() {
        let b = bounds(1, 10, 1, 60);
        let t0 = Instant::now();
        let mut h = History::seeded(t0, 1);
        assert_eq!(decide(&b, &seen(5, 1), None, &mut h, t0).desired, 5);
        let later = decide(&b, &seen(0, 5), None, &mut h, t0 + Duration::from_secs(30));
        assert_eq!((later.desired, later.why), (5, Why::Stabilizing));
        let after = decide(&b, &seen(0, 5), None, &mut h, t0 + Duration::from_secs(61));
        assert_eq!((after.desired, after.why), (1, Why::AtMinimum));
    }

    #[test]
    fn a_model_at_zero_stays_there_until_a_request_is_held_for_it() {
        let b = bounds(0, 4, 8, 300);
        let t0 = Instant::now();
        let mut h = History::seeded(t0, 0);
        let idle = decide(&b, &seen(0, 0), None, &mut h, t0);
        assert_eq!((idle.desired, idle.why), (0, Why::IdleAtZero));
        let held = Observed {
            held: 1,
            ..seen(1, 0)
        };
        let woken = decide(&b, &held, None, &mut h, t0 + Duration::from_secs(1));
        assert_eq!((woken.desired, woken.why), (1, Why::Woken));
    }

    #[test]
    fn without_scale_to_zero_after_a_served_model_keeps_one_replica() {
        let b = bounds(0, 4, 8, 10);
        let t0 = Instant::now();
        let mut h = History::seeded(t0, 1);
        let quiet = Observed {
            idle_for: Duration::from_secs(3600),
            ..seen(0, 1)
        };
        let d = decide(&b, &quiet, None, &mut h, t0 + Duration::from_secs(3600));
        assert_eq!(d.desired, 1);
    }

    #[test]
    fn scale_to_zero_after_idles_the_model_to_zero() {
        let b = Bounds {
            to_zero_after: Some(Duration::from_secs(30)),
            ..bounds(0, 4, 8, 10)
        };
        let t0 = Instant::now();
        let mut h = History::seeded(t0, 1);
        let young = Observed {
            idle_for: Duration::from_secs(20),
            ..seen(0, 1)
        };
        assert_eq!(
            decide(&b, &young, None, &mut h, t0 + Duration::from_secs(20)).desired,
            1
        );
        let old = Observed {
            idle_for: Duration::from_secs(31),
            ..seen(0, 1)
        };
        let d = decide(&b, &old, None, &mut h, t0 + Duration::from_secs(31));
        assert_eq!((d.desired, d.why), (0, Why::IdleAtZero), "{}", d.message);
    }

    #[test]
    fn the_energy_budget_cap_wins_but_never_below_the_minimum() {
        let b = bounds(1, 10, 1, 300);
        let t0 = Instant::now();
        let cap = Cap {
            replicas: 0,
            budget: "solar".into(),
        };
        let d = decide(&b, &seen(6, 1), Some(&cap), &mut History::seeded(t0, 1), t0);
        assert_eq!((d.desired, d.recommended), (1, 6));
        assert_eq!(d.why, Why::CappedByEnergyBudget);
        assert!(d.message.contains("EnergyBudget solar"), "{}", d.message);
        let loose = Cap {
            replicas: 8,
            budget: "solar".into(),
        };
        let d = decide(
            &b,
            &seen(6, 1),
            Some(&loose),
            &mut History::seeded(t0, 1),
            t0,
        );
        assert_eq!((d.desired, d.capped_by), (6, None));
    }

    #[test]
    fn malformed_durations_are_refused() {
        let a = Autoscaling {
            min_replicas: 0,
            max_replicas: 2,
            target_in_flight_per_replica: 4,
            scale_down_stabilization: "soon".into(),
            scale_from_zero_timeout: "120s".into(),
            scale_to_zero_after: None,
        };
        assert!(Bounds::of(&a).is_err());
        let ok = Autoscaling {
            scale_down_stabilization: "5m".into(),
            ..a
        };
        assert_eq!(
            Bounds::of(&ok).map(|b| b.window),
            Ok(Duration::from_secs(300))
        );
    }

    proptest! {
        /// Whatever the demand and the cap: never above maxReplicas or the
        /// cap, never below minReplicas, and never below what demand asks
        /// for now unless a cap says so (scaling up is at once).
        #[test]
        fn decisions_stay_within_the_bounds_and_the_cap(
            min in 0i32..4, extra in 0i32..8, target in 1i32..16,
            demands in proptest::collection::vec((0i64..200, 0u64..120), 1..30),
            cap in proptest::option::of(0i32..12),
        ) {
            let b = bounds(min, (min + extra).max(1), target, 60);
            let t0 = Instant::now();
            let mut h = History::seeded(t0, min);
            let mut t = t0;
            let mut current = min;
            let cap = cap.map(|replicas| Cap { replicas, budget: "b".into() });
            for (demand, step) in demands {
                t += Duration::from_secs(step);
                let d = decide(&b, &seen(demand, current), cap.as_ref(), &mut h, t);
                prop_assert!(d.desired <= b.max);
                prop_assert!(d.desired >= b.min);
                if let Some(c) = &cap {
                    prop_assert!(d.desired <= c.replicas.max(b.min));
                } else {
                    prop_assert!(d.desired >= by_demand(demand, target).min(b.max));
                }
                current = d.desired;
            }
        }

        /// A recommendation holds for the whole window after it was made.
        #[test]
        fn no_scale_down_within_the_window(peak in 1i64..100, gap in 0u64..60) {
            let b = bounds(0, 200, 1, 60);
            let t0 = Instant::now();
            let mut h = History::seeded(t0, 0);
            let up = decide(&b, &seen(peak, 0), None, &mut h, t0);
            let later = decide(&b, &seen(0, up.desired), None, &mut h, t0 + Duration::from_secs(gap));
            prop_assert_eq!(later.desired, up.desired);
        }
    }
}
