//! The controller's Prometheus metrics. Names are stable and documented in
//! docs/metrics.md; dashboards may use only names registered here.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: String,
    pub error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub kind: String,
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerbLabels {
    pub verb: String,
    /// The resource (plural, `/subresource` appended), or `other` for a
    /// path that names none (discovery).
    pub resource: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

/// One ModelDeployment.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelKeyLabels {
    pub namespace: String,
    pub model: String,
}

/// Everything the controller measures.
pub struct ControllerMetrics {
    pub reconciliations: Family<KindLabels, Counter>,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub reconcile_duration: Family<KindLabels, Histogram>,
    pub objects: Family<StateLabels, Gauge<i64, std::sync::atomic::AtomicI64>>,
    pub placement_failures: Family<ReasonLabels, Counter>,
    pub leader: Gauge<i64, std::sync::atomic::AtomicI64>,
    pub api_writes: Family<KindLabels, Counter<u64, AtomicU64>>,
    pub api_requests: Family<VerbLabels, Counter<u64, AtomicU64>>,
    pub desired_replicas: Family<ModelKeyLabels, Gauge<i64, std::sync::atomic::AtomicI64>>,
    pub model_in_flight: Family<ModelKeyLabels, Gauge<i64, std::sync::atomic::AtomicI64>>,
}

/// Metric names (without the `copyhold_controller_` prefix), for the docs
/// and the dashboard test.
pub const NAMES: &[&str] = &[
    "reconciliations_total",
    "reconcile_errors_total",
    "reconcile_duration_seconds",
    "objects",
    "placement_failures_total",
    "leader",
    "api_writes_total",
    "api_requests_total",
    "model_desired_replicas",
    "model_in_flight_requests",
];

impl ControllerMetrics {
    /// Register every metric under `copyhold_controller_`.
    pub fn register(registry: &mut Registry) -> Self {
        let sub = registry.sub_registry_with_prefix("copyhold_controller");
        let m = Self {
            reconciliations: Family::default(),
            reconcile_errors: Family::default(),
            reconcile_duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 14))
            }),
            objects: Family::default(),
            placement_failures: Family::default(),
            leader: Gauge::default(),
            api_writes: Family::default(),
            api_requests: Family::default(),
            desired_replicas: Family::default(),
            model_in_flight: Family::default(),
        };
        sub.register(
            "reconciliations",
            "Reconciliations run, by kind",
            m.reconciliations.clone(),
        );
        sub.register(
            "reconcile_errors",
            "Reconciliations that failed, by kind and error",
            m.reconcile_errors.clone(),
        );
        sub.register(
            "reconcile_duration_seconds",
            "Time one reconciliation took",
            m.reconcile_duration.clone(),
        );
        sub.register("objects", "Objects by kind and state", m.objects.clone());
        sub.register(
            "placement_failures",
            "ModelDeployments that could not be placed, by reason",
            m.placement_failures.clone(),
        );
        sub.register(
            "leader",
            "1 while this process holds the leader lease",
            m.leader.clone(),
        );
        sub.register(
            "api_writes",
            "Writes (apply, patch, create) sent to the API server, by kind",
            m.api_writes.clone(),
        );
        sub.register(
            "api_requests",
            "Requests sent to the API server, by HTTP method and resource",
            m.api_requests.clone(),
        );
        sub.register(
            "model_desired_replicas",
            "Replicas the autoscaler decided on, by ModelDeployment (after the energy budget's cap)",
            m.desired_replicas.clone(),
        );
        sub.register(
            "model_in_flight_requests",
            "Requests in flight or held, summed over the live gateway replicas, as the autoscaler read them",
            m.model_in_flight.clone(),
        );
        m
    }

    pub fn kind(kind: &str) -> KindLabels {
        KindLabels {
            kind: kind.to_owned(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BudgetLabels {
    pub budget: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabels {
    pub budget: String,
    /// `Down` or `Up`.
    pub direction: String,
}

type GaugeF = Gauge<f64, AtomicU64>;

/// The EnergyBudget controller's figures, per budget.
pub struct EnergyMetrics {
    pub supply_watts: Family<BudgetLabels, GaugeF>,
    pub allowance_watts: Family<BudgetLabels, GaugeF>,
    pub draw_watts: Family<BudgetLabels, GaugeF>,
    pub ladder_step: Family<BudgetLabels, Gauge<i64, std::sync::atomic::AtomicI64>>,
    pub transitions: Family<TransitionLabels, Counter<u64, AtomicU64>>,
    pub energy_joules: Family<BudgetLabels, Counter<f64, AtomicU64>>,
}

/// Full names of the energy metrics, for the docs and the dashboard test.
pub const ENERGY_NAMES: &[&str] = &[
    "copyhold_energy_supply_watts",
    "copyhold_energy_allowance_watts",
    "copyhold_energy_draw_watts",
    "copyhold_energy_ladder_step",
    "copyhold_energy_transitions_total",
    "copyhold_energy_energy_joules_total",
];

impl EnergyMetrics {
    /// Register every metric under `copyhold_energy_`.
    pub fn register(registry: &mut Registry) -> Self {
        let sub = registry.sub_registry_with_prefix("copyhold_energy");
        let m = Self {
            supply_watts: Family::default(),
            allowance_watts: Family::default(),
            draw_watts: Family::default(),
            ladder_step: Family::default(),
            transitions: Family::default(),
            energy_joules: Family::default(),
        };
        sub.register(
            "supply_watts",
            "Renewable supply used for the last decision (fail-safe value when stale)",
            m.supply_watts.clone(),
        );
        sub.register(
            "allowance_watts",
            "min(ceiling, supply x (1 - margin))",
            m.allowance_watts.clone(),
        );
        sub.register(
            "draw_watts",
            "Measured draw of the covered nodes",
            m.draw_watts.clone(),
        );
        sub.register(
            "ladder_step",
            "Highest ladder rung in force (0 none, 1 power cap, 2 shed deferrable, 3 shed standard, 4 defer)",
            m.ladder_step.clone(),
        );
        sub.register(
            "transitions",
            "Ladder step changes, by direction",
            m.transitions.clone(),
        );
        sub.register(
            "energy_joules",
            "Energy drawn by the covered nodes",
            m.energy_joules.clone(),
        );
        m
    }

    pub fn budget(name: &str) -> BudgetLabels {
        BudgetLabels {
            budget: name.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_energy_name_is_exported() {
        let mut registry = Registry::default();
        let m = EnergyMetrics::register(&mut registry);
        let b = EnergyMetrics::budget("solar");
        m.supply_watts.get_or_create(&b).set(1.0);
        m.allowance_watts.get_or_create(&b).set(1.0);
        m.draw_watts.get_or_create(&b).set(1.0);
        m.ladder_step.get_or_create(&b).set(1);
        m.transitions
            .get_or_create(&TransitionLabels {
                budget: "solar".into(),
                direction: "Down".into(),
            })
            .inc();
        m.energy_joules.get_or_create(&b).inc_by(1.5);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
        for name in ENERGY_NAMES {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
        let documented =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md"))
                .expect("docs/metrics.md");
        for name in ENERGY_NAMES {
            assert!(documented.contains(name), "{name} not in docs/metrics.md");
        }
    }

    #[test]
    fn every_documented_name_is_exported() {
        let mut registry = Registry::default();
        let m = ControllerMetrics::register(&mut registry);
        // Families print nothing until they have a series.
        m.reconciliations
            .get_or_create(&ControllerMetrics::kind("ModelDeployment"))
            .inc();
        m.reconcile_errors
            .get_or_create(&ErrorLabels {
                kind: "x".into(),
                error: "y".into(),
            })
            .inc();
        m.reconcile_duration
            .get_or_create(&ControllerMetrics::kind("x"))
            .observe(0.1);
        m.objects
            .get_or_create(&StateLabels {
                kind: "x".into(),
                state: "Ready".into(),
            })
            .set(1);
        m.placement_failures
            .get_or_create(&ReasonLabels {
                reason: "InsufficientVRAM".into(),
            })
            .inc();
        m.api_writes
            .get_or_create(&ControllerMetrics::kind("x"))
            .inc();
        m.api_requests
            .get_or_create(&VerbLabels {
                verb: "GET".into(),
                resource: "pods".into(),
            })
            .inc();
        let md = ModelKeyLabels {
            namespace: "n".into(),
            model: "m".into(),
        };
        m.desired_replicas.get_or_create(&md).set(2);
        m.model_in_flight.get_or_create(&md).set(3);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
        for name in NAMES {
            assert!(
                text.contains(&format!("copyhold_controller_{name}")),
                "{name} missing from:\n{text}"
            );
        }
    }
}
