//! The autoscaler's I/O: the demand the gateway replicas publish in their
//! Leases (see `gateway::demand`), summed over the live ones, and the
//! recommendation history of each autoscaled ModelDeployment. The decision
//! itself is `serving::autoscale::decide`.
//!
//! A Lease is live while its resourceVersion moves: the time it last moved
//! is taken from this process's monotonic clock when the watch delivers the
//! change, so a gateway whose clock is wrong is still judged right, and a
//! gateway that died stops counting [`DEMAND_TTL`] after its last write.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::ResourceExt;
use kube::runtime::reflector::Store;

use kube::runtime::events::{Event, EventType};

use super::Context;
use crate::metrics::ModelKeyLabels;
use crate::resources::{ModelDeployment, ModelDeploymentStatus};
use crate::serving::autoscale::{
    self, Bounds, Cap, DEMAND_ANNOTATION, DEMAND_TTL, Decision, History, Observed, PublishedDemand,
};

/// A decision and what it was made from.
#[derive(Clone, Debug)]
pub struct Scaled {
    pub decision: Decision,
    pub observed: Observed,
}

/// One model's memory across reconciles.
struct ModelState {
    history: History,
    /// When demand was last seen above zero (or when this process met the
    /// model).
    last_busy: Instant,
}

/// The watched demand Leases and the per-model histories.
pub struct Autoscaler {
    leases: Store<Lease>,
    /// Lease `namespace/name` → (resourceVersion, when it was first seen).
    moved: Mutex<HashMap<String, (String, Instant)>>,
    models: Mutex<HashMap<String, ModelState>>,
}

impl Autoscaler {
    pub fn new(leases: Store<Lease>) -> Self {
        Self {
            leases,
            moved: Mutex::new(HashMap::new()),
            models: Mutex::new(HashMap::new()),
        }
    }

    /// In flight and held for `ns/name`, over the Leases that moved within
    /// [`DEMAND_TTL`].
    pub fn demand(&self, ns: &str, name: &str, now: Instant) -> (i64, i64) {
        let leases = self.leases.state();
        let mut moved = self.moved.lock().unwrap_or_else(|e| e.into_inner());
        moved.retain(|k, _| {
            leases
                .iter()
                .any(|l| format!("{}/{}", l.namespace().unwrap_or_default(), l.name_any()) == *k)
        });
        let (mut in_flight, mut held) = (0, 0);
        for l in leases
            .iter()
            .filter(|l| l.namespace().as_deref() == Some(ns))
        {
            let key = format!("{ns}/{}", l.name_any());
            let rv = l.resource_version().unwrap_or_default();
            let seen = moved.entry(key).or_insert_with(|| (rv.clone(), now));
            if seen.0 != rv {
                *seen = (rv, now);
            }
            if now.saturating_duration_since(seen.1) >= DEMAND_TTL {
                continue;
            }
            let Some(d) = l
                .annotations()
                .get(DEMAND_ANNOTATION)
                .and_then(|a| serde_json::from_str::<PublishedDemand>(a).ok())
                .and_then(|m| m.get(name).copied())
            else {
                continue;
            };
            in_flight += d.in_flight.max(0);
            held += d.held.max(0);
        }
        (in_flight, held)
    }

    /// The decision for `md`, which runs `current` replicas now, under the
    /// budget's `cap`. `None` without (valid) `spec.autoscaling`.
    pub fn decide(
        &self,
        md: &ModelDeployment,
        current: i32,
        cap: Option<Cap>,
        now: Instant,
    ) -> Option<Scaled> {
        let bounds = Bounds::of(md.spec.autoscaling.as_ref()?).ok()?;
        let ns = md.namespace().unwrap_or_default();
        let name = md.name_any();
        let (in_flight, held) = self.demand(&ns, &name, now);
        let mut models = self.models.lock().unwrap_or_else(|e| e.into_inner());
        let state = models
            .entry(format!("{ns}/{name}"))
            .or_insert_with(|| ModelState {
                history: History::seeded(now, current),
                last_busy: now,
            });
        if in_flight > 0 || held > 0 {
            state.last_busy = now;
        }
        let observed = Observed {
            demand: in_flight.max(held),
            held,
            current,
            idle_for: now.saturating_duration_since(state.last_busy),
        };
        let decision = autoscale::decide(&bounds, &observed, cap.as_ref(), &mut state.history, now);
        Some(Scaled { decision, observed })
    }
}

/// How soon an autoscaled model is looked at again without an event: the
/// stabilisation window and the Leases' liveness run on time alone.
pub const REQUEUE: Duration = Duration::from_secs(3);

/// Report a decision: `desiredReplicas`, `scaleReason` and `inFlight` in
/// the status, the gauges, and an Event when the replicas or the reason
/// word change (a scaling, a cap, a wake-up).
pub fn report(
    md: &ModelDeployment,
    scaled: &Scaled,
    old: &ModelDeploymentStatus,
    status: &mut ModelDeploymentStatus,
    events: &mut Vec<Event>,
    ctx: &Context,
) {
    let d = &scaled.decision;
    let line = d.reason_line();
    let labels = ModelKeyLabels {
        namespace: md.namespace().unwrap_or_default(),
        model: md.name_any(),
    };
    ctx.metrics
        .desired_replicas
        .get_or_create(&labels)
        .set(i64::from(d.desired));
    ctx.metrics
        .model_in_flight
        .get_or_create(&labels)
        .set(scaled.observed.demand);
    let old_why = old
        .scale_reason
        .as_deref()
        .and_then(|r| r.split(':').next());
    let changed = old.desired_replicas != Some(d.desired) || old_why != Some(d.why.as_str());
    status.desired_replicas = Some(d.desired);
    status.scale_reason = Some(line.clone());
    status.in_flight = Some(scaled.observed.demand);
    if !changed {
        return;
    }
    let current = scaled.observed.current;
    let reason = if d.desired > current {
        "ScaledUp"
    } else if d.desired < current {
        "ScaledDown"
    } else {
        d.why.as_str()
    };
    events.push(Event {
        type_: if d.capped_by.is_some() {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.into(),
        note: Some(format!("{current} → {} replicas; {line}", d.desired)),
        action: "Scale".into(),
        secondary: None,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::reflector;
    use kube::runtime::watcher;

    fn lease(name: &str, rv: &str, model: &str, in_flight: i64, held: i64) -> Lease {
        let demand = serde_json::json!({ model: {"inFlight": in_flight, "held": held} });
        serde_json::from_value(serde_json::json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": name, "namespace": "town", "resourceVersion": rv,
                         "annotations": {DEMAND_ANNOTATION: demand.to_string()}},
        }))
        .expect("a Lease")
    }

    #[test]
    fn demand_is_summed_over_gateways_and_a_lease_that_stops_moving_stops_counting() {
        let (reader, mut writer) = reflector::store::<Lease>();
        writer.apply_watcher_event(&watcher::Event::Apply(lease("gw-a", "1", "tiny", 5, 1)));
        writer.apply_watcher_event(&watcher::Event::Apply(lease("gw-b", "2", "tiny", 2, 0)));
        writer.apply_watcher_event(&watcher::Event::Apply(lease("gw-c", "3", "other", 9, 0)));
        let a = Autoscaler::new(reader);
        let t0 = Instant::now();
        let second = Duration::from_secs(1);
        assert_eq!(a.demand("town", "tiny", t0), (7, 1));
        assert_eq!(a.demand("elsewhere", "tiny", t0), (0, 0));
        // gw-b keeps writing; gw-a has died.
        writer.apply_watcher_event(&watcher::Event::Apply(lease("gw-b", "4", "tiny", 3, 0)));
        assert_eq!(a.demand("town", "tiny", t0 + DEMAND_TTL - second), (8, 1));
        writer.apply_watcher_event(&watcher::Event::Apply(lease("gw-b", "5", "tiny", 3, 0)));
        assert_eq!(a.demand("town", "tiny", t0 + DEMAND_TTL), (3, 0));
        // gw-a comes back: it counts again from its new version.
        writer.apply_watcher_event(&watcher::Event::Apply(lease("gw-a", "6", "tiny", 1, 0)));
        assert_eq!(a.demand("town", "tiny", t0 + DEMAND_TTL + second), (4, 0));
    }
}
