//! The gateway's Prometheus metrics, under `copyhold_gateway_`. Names are
//! stable and documented in docs/metrics.md.

use std::sync::atomic::{AtomicI64, AtomicU64};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::keys::Owner;
use crate::resources::stint_quota::{MemberState, StintQuotaStatus};

/// A member as metrics name it: its StintQuota's namespace and name with
/// the member's name, so same-named members of two tenants stay apart.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MemberLabels {
    pub namespace: String,
    pub quota: String,
    pub member: String,
}

impl MemberLabels {
    /// The key's owner.
    pub fn of(owner: &Owner) -> Self {
        Self {
            namespace: owner.namespace.clone(),
            quota: owner.quota.clone(),
            member: owner.member.clone(),
        }
    }

    /// A request whose key opened no member.
    pub fn unknown() -> Self {
        Self {
            namespace: String::new(),
            quota: String::new(),
            member: "unknown".into(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub namespace: String,
    pub quota: String,
    pub member: String,
    pub model: String,
    pub code: String,
}

impl RequestLabels {
    pub fn new(who: &MemberLabels, model: &str, code: u16) -> Self {
        Self {
            namespace: who.namespace.clone(),
            quota: who.quota.clone(),
            member: who.member.clone(),
            model: model.into(),
            code: code.to_string(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub namespace: String,
    pub quota: String,
    pub member: String,
    pub kind: String,
}

impl TokenLabels {
    pub fn new(who: &MemberLabels, kind: &str) -> Self {
        Self {
            namespace: who.namespace.clone(),
            quota: who.quota.clone(),
            member: who.member.clone(),
            kind: kind.into(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
}

/// A held request's model and how its wait ended (`ready`, `refused`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HoldLabels {
    pub model: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamErrorLabels {
    pub model: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegisterLabels {
    pub namespace: String,
    pub quota: String,
    pub member: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegisterStateLabels {
    pub namespace: String,
    pub quota: String,
    pub member: String,
    pub state: String,
}

/// Everything the gateway measures.
pub struct GatewayMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub tokens: Family<TokenLabels, Counter>,
    pub energy_joules: Family<MemberLabels, Counter<f64, AtomicU64>>,
    pub request_duration: Family<ModelLabels, Histogram>,
    pub time_to_first_token: Family<ModelLabels, Histogram>,
    pub in_flight: Family<ModelLabels, Gauge<i64, AtomicI64>>,
    pub upstream_errors: Family<UpstreamErrorLabels, Counter>,
    pub ledger_operations: Family<OpLabels, Counter>,
    pub ledger_conflicts: Counter,
    pub member_tokens: Family<RegisterLabels, Gauge<i64, AtomicI64>>,
    pub member_stint_tokens: Family<RegisterLabels, Gauge<i64, AtomicI64>>,
    pub member_energy_wh: Family<RegisterLabels, Gauge<f64, AtomicU64>>,
    pub member_state: Family<RegisterStateLabels, Gauge<i64, AtomicI64>>,
    pub period_reset_timestamp: Family<RegisterLabels, Gauge<i64, AtomicI64>>,
    pub keys: Gauge<i64, AtomicI64>,
    pub held_requests: Family<ModelLabels, Gauge<i64, AtomicI64>>,
    pub hold_wait: Family<HoldLabels, Histogram>,
}

/// Metric names without the `copyhold_gateway_` prefix, for the docs and
/// the dashboard test (counters get `_total` on export).
pub const NAMES: &[&str] = &[
    "requests_total",
    "tokens_total",
    "energy_joules_total",
    "request_duration_seconds",
    "time_to_first_token_seconds",
    "in_flight_requests",
    "upstream_errors_total",
    "ledger_operations_total",
    "ledger_conflicts_total",
    "member_tokens",
    "member_stint_tokens",
    "member_energy_wh",
    "member_state",
    "period_reset_timestamp_seconds",
    "api_keys",
    "held_requests",
    "hold_wait_seconds",
];

impl GatewayMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let sub = registry.sub_registry_with_prefix("copyhold_gateway");
        let latency = || Histogram::new(exponential_buckets(0.0005, 2.0, 18));
        let m = Self {
            requests: Family::default(),
            tokens: Family::default(),
            energy_joules: Family::default(),
            request_duration: Family::new_with_constructor(latency),
            time_to_first_token: Family::new_with_constructor(latency),
            in_flight: Family::default(),
            upstream_errors: Family::default(),
            ledger_operations: Family::default(),
            ledger_conflicts: Counter::default(),
            member_tokens: Family::default(),
            member_stint_tokens: Family::default(),
            member_energy_wh: Family::default(),
            member_state: Family::default(),
            period_reset_timestamp: Family::default(),
            keys: Gauge::default(),
            held_requests: Family::default(),
            hold_wait: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.1, 2.0, 12))
            }),
        };
        sub.register(
            "requests",
            "Requests by member (namespace, quota, member), model and HTTP status code",
            m.requests.clone(),
        );
        sub.register(
            "tokens",
            "Tokens settled by member (namespace, quota, member) and kind (prompt, completion)",
            m.tokens.clone(),
        );
        sub.register(
            "energy_joules",
            "Energy settled by member (namespace, quota, member)",
            m.energy_joules.clone(),
        );
        sub.register(
            "request_duration_seconds",
            "Time from request to the end of the response",
            m.request_duration.clone(),
        );
        sub.register(
            "time_to_first_token_seconds",
            "Time from request to the first byte of the upstream's response body",
            m.time_to_first_token.clone(),
        );
        sub.register(
            "in_flight_requests",
            "Requests being served, by model",
            m.in_flight.clone(),
        );
        sub.register(
            "upstream_errors",
            "Upstream failures by model and kind (connect, timeout, status, body)",
            m.upstream_errors.clone(),
        );
        sub.register(
            "ledger_operations",
            "Register operations (read, write, lease, return, reclaim)",
            m.ledger_operations.clone(),
        );
        sub.register(
            "ledger_conflicts",
            "Register writes refused for a stale resourceVersion and redone",
            m.ledger_conflicts.clone(),
        );
        sub.register(
            "member_tokens",
            "Weighted tokens in the register this period",
            m.member_tokens.clone(),
        );
        sub.register(
            "member_stint_tokens",
            "A member's token stint this period (absent when unlimited)",
            m.member_stint_tokens.clone(),
        );
        sub.register(
            "member_energy_wh",
            "Watt-hours in the register this period",
            m.member_energy_wh.clone(),
        );
        sub.register(
            "member_state",
            "1 for a member's standing (ok, warned, throttled, suspended), 0 for the others",
            m.member_state.clone(),
        );
        sub.register(
            "period_reset_timestamp_seconds",
            "When the member's period resets (Unix seconds)",
            m.period_reset_timestamp.clone(),
        );
        sub.register(
            "api_keys",
            "Members' API keys known to this replica",
            m.keys.clone(),
        );
        sub.register(
            "held_requests",
            "Requests held while their model has no ready replica (the queue of a scale from zero), by model",
            m.held_requests.clone(),
        );
        sub.register(
            "hold_wait_seconds",
            "How long held requests waited for a ready replica, by model and outcome (ready, refused)",
            m.hold_wait.clone(),
        );
        m
    }

    pub fn ledger_op(&self, op: &str) {
        self.ledger_operations
            .get_or_create(&OpLabels { op: op.into() })
            .inc();
    }

    /// Mirror a freshly written register.
    pub fn observe_register(&self, namespace: &str, quota: &str, st: &StintQuotaStatus) {
        let reset = st.resets_at.as_ref().map(|t| t.0.as_second()).unwrap_or(0);
        for u in &st.members {
            let l = RegisterLabels {
                namespace: namespace.into(),
                quota: quota.into(),
                member: u.name.clone(),
            };
            self.member_tokens.get_or_create(&l).set(u.tokens);
            if let Some(s) = u.stint_tokens {
                self.member_stint_tokens.get_or_create(&l).set(s);
            }
            self.member_energy_wh.get_or_create(&l).set(u.energy_wh);
            self.period_reset_timestamp.get_or_create(&l).set(reset);
            for s in [
                MemberState::Ok,
                MemberState::Warned,
                MemberState::Throttled,
                MemberState::Suspended,
            ] {
                let name = serde_json::to_value(s)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default();
                self.member_state
                    .get_or_create(&RegisterStateLabels {
                        namespace: namespace.into(),
                        quota: quota.into(),
                        member: u.name.clone(),
                        state: name,
                    })
                    .set(i64::from(s == u.state));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_name_is_exported() {
        let mut r = Registry::default();
        let m = GatewayMetrics::register(&mut r);
        // Families appear once they have a series.
        let a = MemberLabels {
            namespace: "ns".into(),
            quota: "q".into(),
            member: "a".into(),
        };
        m.requests
            .get_or_create(&RequestLabels::new(&a, "m", 200))
            .inc();
        m.tokens
            .get_or_create(&TokenLabels::new(&a, "prompt"))
            .inc();
        m.energy_joules.get_or_create(&a).inc();
        m.request_duration
            .get_or_create(&ModelLabels { model: "m".into() })
            .observe(0.1);
        m.time_to_first_token
            .get_or_create(&ModelLabels { model: "m".into() })
            .observe(0.1);
        m.in_flight
            .get_or_create(&ModelLabels { model: "m".into() })
            .set(0);
        m.upstream_errors
            .get_or_create(&UpstreamErrorLabels {
                model: "m".into(),
                kind: "connect".into(),
            })
            .inc();
        m.ledger_op("write");
        m.held_requests
            .get_or_create(&ModelLabels { model: "m".into() })
            .set(0);
        m.hold_wait
            .get_or_create(&HoldLabels {
                model: "m".into(),
                outcome: "ready".into(),
            })
            .observe(1.0);
        let st: StintQuotaStatus = serde_json::from_value(serde_json::json!({
            "members": [{"name": "a", "tokens": 5, "stintTokens": 10, "state": "warned"}],
            "resetsAt": "2026-12-01T00:00:00Z"
        }))
        .unwrap();
        m.observe_register("ns", "q", &st);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
        for n in NAMES {
            assert!(
                out.contains(&format!("copyhold_gateway_{n}")),
                "{n} missing from\n{out}"
            );
        }
        assert!(out.contains(
            r#"copyhold_gateway_member_state{namespace="ns",quota="q",member="a",state="warned"} 1"#
        ));
        assert!(out.contains(
            r#"copyhold_gateway_requests_total{namespace="ns",quota="q",member="a",model="m",code="200"} 1"#
        ));
    }
}
