//! Prometheus metrics of the node, all named `copyhold_node_…`:
//!
//! | name | type | meaning |
//! | --- | --- | --- |
//! | `copyhold_node_requests_total{outcome}` | counter | finished requests by outcome (`ok`, `cancelled`, `rejected`, `error`) |
//! | `copyhold_node_prompt_tokens_total` | counter | prompt tokens of finished requests |
//! | `copyhold_node_generation_tokens_total` | counter | generated tokens of finished requests |
//! | `copyhold_node_queue_depth` | gauge | requests waiting for admission |
//! | `copyhold_node_running_sequences` | gauge | sequences in the running batch |
//! | `copyhold_node_kv_blocks_in_use` / `_total` | gauge | paged KV blocks referenced / existing |
//! | `copyhold_node_power_watts` | gauge | power over the last engine step |
//! | `copyhold_node_energy_joules_total` | counter | joules of all engine steps (the sum of requests' `energy_joules`) |
//! | `copyhold_node_power_limit_watts` | gauge | limit in force, 0 when none |
//! | `copyhold_node_step_duration_seconds` | histogram | engine step time |
//! | `copyhold_node_preemptions_total` | counter | sequences preempted for lack of KV blocks (recomputed later) |

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: String,
}

/// Metric names without the `copyhold_node_` prefix (counters with their
/// `_total`), for the docs and the dashboard test; a test below checks that
/// `/metrics` (what [`Metrics::render`] prints) carries every one.
pub const NAMES: &[&str] = &[
    "requests_total",
    "prompt_tokens_total",
    "generation_tokens_total",
    "queue_depth",
    "running_sequences",
    "kv_blocks_in_use",
    "kv_blocks_total",
    "power_watts",
    "energy_joules_total",
    "power_limit_watts",
    "step_duration_seconds",
    "preemptions_total",
];

/// Every metric the node exports.
pub struct Metrics {
    pub registry: Registry,
    pub requests: Family<Outcome, Counter>,
    pub prompt_tokens: Counter,
    pub generation_tokens: Counter,
    pub queue_depth: Gauge,
    pub running: Gauge,
    pub kv_blocks_in_use: Gauge,
    pub kv_blocks_total: Gauge,
    pub power_watts: Gauge<f64, AtomicU64>,
    pub energy_joules: Counter<f64, AtomicU64>,
    pub power_limit_watts: Gauge<f64, AtomicU64>,
    pub step_seconds: Histogram,
    pub preemptions: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut root = Registry::default();
        let r = root.sub_registry_with_prefix("copyhold_node");
        let m = Metrics {
            registry: Registry::default(),
            requests: Family::default(),
            prompt_tokens: Counter::default(),
            generation_tokens: Counter::default(),
            queue_depth: Gauge::default(),
            running: Gauge::default(),
            kv_blocks_in_use: Gauge::default(),
            kv_blocks_total: Gauge::default(),
            power_watts: Gauge::default(),
            energy_joules: Counter::default(),
            power_limit_watts: Gauge::default(),
            step_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            preemptions: Counter::default(),
        };
        r.register(
            "requests",
            "Finished requests by outcome",
            m.requests.clone(),
        );
        r.register(
            "prompt_tokens",
            "Prompt tokens of finished requests",
            m.prompt_tokens.clone(),
        );
        r.register(
            "generation_tokens",
            "Generated tokens",
            m.generation_tokens.clone(),
        );
        r.register(
            "queue_depth",
            "Requests waiting for admission",
            m.queue_depth.clone(),
        );
        r.register(
            "running_sequences",
            "Sequences in the running batch",
            m.running.clone(),
        );
        r.register(
            "kv_blocks_in_use",
            "Paged KV blocks referenced by sequences",
            m.kv_blocks_in_use.clone(),
        );
        r.register(
            "kv_blocks_total",
            "Paged KV blocks in the cache",
            m.kv_blocks_total.clone(),
        );
        r.register(
            "power_watts",
            "Power over the last engine step",
            m.power_watts.clone(),
        );
        r.register(
            "energy_joules",
            "Energy of all engine steps",
            m.energy_joules.clone(),
        );
        r.register(
            "power_limit_watts",
            "Power limit in force (0: none)",
            m.power_limit_watts.clone(),
        );
        r.register(
            "step_duration_seconds",
            "Engine step duration",
            m.step_seconds.clone(),
        );
        r.register(
            "preemptions",
            "Sequences preempted for lack of KV blocks (recomputed later)",
            m.preemptions.clone(),
        );
        Metrics {
            registry: root,
            ..m
        }
    }

    pub fn count(&self, outcome: &str) {
        self.requests
            .get_or_create(&Outcome {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// Text exposition format.
    pub fn render(&self) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}

/// Energy counter readable without the registry (tests, usage checks).
pub fn load_f64(a: &AtomicU64) -> f64 {
    f64::from_bits(a.load(Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_name_is_exported() {
        let m = Metrics::new();
        // A family prints nothing until it has a series.
        m.count("ok");
        let text = m.render();
        for name in NAMES {
            let full = format!("copyhold_node_{name}");
            assert!(
                text.lines().any(|l| l.starts_with(&full)),
                "{full} missing from\n{text}"
            );
        }
    }
}
