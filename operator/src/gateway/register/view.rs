//! The register's data, pure: a StintQuota (spec and status) and the
//! EnergyBudgets covering its models, brought up to `now` with the ledger's
//! own [`ledger::refresh`] (so a register nobody has written since its
//! period reset shows the new period, as the next write will). This is
//! what `/register.json` serves and what the HTML is rendered from.

use std::sync::Arc;

use jiff::Timestamp;
use serde::Serialize;

use crate::commons::ledger;
use crate::commons::stint;
use crate::resources::energy_budget::EnergyBudget;
use crate::resources::stint_quota::{MemberState, RegisterVisibility, StintQuota};

/// One StintQuota's register.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Register {
    pub namespace: String,
    pub name: String,
    pub visibility: RegisterVisibility,
    /// In words, e.g. `calendar month (Europe/Berlin)`.
    pub period: String,
    /// IANA zone the page writes times in (UTC for rolling periods).
    pub time_zone: String,
    pub rolling: bool,
    pub period_start: Option<Timestamp>,
    pub resets_at: Option<Timestamp>,
    pub sanctions: Thresholds,
    pub members: Vec<MemberLine>,
    pub energy: Vec<BudgetLine>,
}

/// The graduated sanctions, in percent of a stint.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Thresholds {
    pub warn_at: f64,
    pub throttle_at: f64,
    pub suspend_at: f64,
    pub throttled_requests_per_minute: i32,
    pub throttled_only_when_idle: bool,
}

/// One member's line.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberLine {
    pub name: String,
    pub state: MemberState,
    /// Weighted tokens the sanctions count (this period's, plus the sliding
    /// share of the previous window for rolling periods).
    pub tokens: i64,
    pub stint_tokens: Option<i64>,
    /// `tokens` in percent of `stintTokens`, to a tenth.
    pub tokens_percent: Option<f64>,
    pub energy_wh: f64,
    pub stint_energy_wh: Option<f64>,
    pub energy_percent: Option<f64>,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub reclaimed_tokens: i64,
    pub history: Vec<PastPeriod>,
}

/// A member's past period.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PastPeriod {
    pub start: Timestamp,
    pub end: Timestamp,
    pub tokens: i64,
    pub energy_wh: f64,
    pub requests: i64,
}

/// An EnergyBudget covering the register's models.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BudgetLine {
    pub name: String,
    /// `WithinBudget`, `PowerCapped`, `Shedding`, `Deferring`.
    pub state: Option<String>,
    pub supply_watts: Option<f64>,
    pub allowance_watts: Option<f64>,
    pub draw_watts: Option<f64>,
    pub evaluated_at: Option<Timestamp>,
    /// Supply and draw over the last 24 hours, oldest first.
    pub history: Vec<PowerPoint>,
}

/// Mean supply and draw over 15 minutes from `at`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PowerPoint {
    pub at: Timestamp,
    pub supply_watts: f64,
    pub draw_watts: f64,
}

/// Percent to a tenth; `None` without a (positive) stint.
fn percent(used: f64, stint: Option<f64>) -> Option<f64> {
    match stint {
        Some(s) if s > 0.0 => Some(((used / s) * 1000.0).round() / 10.0),
        _ => None,
    }
}

/// The register of `quota` at `now`, with the budgets (already chosen by
/// [`budgets_covering`]).
pub fn register(quota: &StintQuota, budgets: &[&EnergyBudget], now: Timestamp) -> Register {
    let spec = &quota.spec;
    let mut status = quota.status.clone().unwrap_or_default();
    status.hydrate_history();
    let period = stint::current_period(spec, now).ok();
    let previous_weight = period.map_or(0.0, |p| p.previous_weight(now));
    if let Some(p) = period {
        // The view's own copy: nothing is written. No replica is named, so
        // slices of replicas past their TTL show as charged, as they will be.
        ledger::refresh(
            spec,
            &mut status,
            p,
            now,
            spec.ledger.replica_ttl_seconds,
            "",
            &mut ledger::Heartbeats::default(),
        );
    }
    // The register keeps a removed member's line while it holds usage (it
    // is history); the page lists the quota's members.
    let listed: std::collections::HashSet<&str> =
        spec.members.iter().map(|m| m.name.as_str()).collect();
    let members = status
        .members
        .iter()
        .filter(|u| listed.contains(u.name.as_str()))
        .map(|u| {
            let tokens = stint::effective_tokens(u, previous_weight);
            let energy_wh = stint::effective_energy_wh(u, previous_weight);
            MemberLine {
                name: u.name.clone(),
                state: u.state,
                tokens,
                stint_tokens: u.stint_tokens,
                tokens_percent: percent(tokens as f64, u.stint_tokens.map(|t| t as f64)),
                energy_wh,
                stint_energy_wh: u.stint_energy_wh,
                energy_percent: percent(energy_wh, u.stint_energy_wh),
                requests: u.requests,
                prompt_tokens: u.prompt_tokens,
                completion_tokens: u.completion_tokens,
                reclaimed_tokens: u.reclaimed_tokens,
                history: u
                    .history
                    .iter()
                    .map(|h| PastPeriod {
                        start: h.start.0,
                        end: h.end.0,
                        tokens: h.tokens,
                        energy_wh: h.energy_wh,
                        requests: h.requests,
                    })
                    .collect(),
            }
        })
        .collect();
    let s = &spec.sanctions;
    Register {
        namespace: quota.metadata.namespace.clone().unwrap_or_default(),
        name: quota.metadata.name.clone().unwrap_or_default(),
        visibility: spec.register.visibility,
        period: stint::describe_period(spec),
        time_zone: match spec.period.type_ {
            crate::resources::stint_quota::PeriodType::Calendar => spec.period.time_zone.clone(),
            crate::resources::stint_quota::PeriodType::Rolling => "UTC".into(),
        },
        rolling: period.is_some_and(|p| p.rolling),
        period_start: period.map(|p| p.start),
        resets_at: period.map(|p| p.end),
        sanctions: Thresholds {
            warn_at: s.warn_at,
            throttle_at: s.throttle_at,
            suspend_at: s.suspend_at,
            throttled_requests_per_minute: s.throttle.requests_per_minute,
            throttled_only_when_idle: s.throttle.only_when_idle,
        },
        members,
        energy: budgets.iter().map(|b| budget_line(b, now)).collect(),
    }
}

fn budget_line(b: &EnergyBudget, now: Timestamp) -> BudgetLine {
    let st = b.status.clone().unwrap_or_default();
    let oldest = now - crate::energy::history::WINDOW;
    BudgetLine {
        name: b.metadata.name.clone().unwrap_or_default(),
        state: st.state,
        supply_watts: st.supply_watts,
        allowance_watts: st.allowance_watts,
        draw_watts: st.draw_watts,
        evaluated_at: st.last_evaluated.as_ref().map(|t| t.0),
        history: st
            .history
            .iter()
            .map(|p| PowerPoint {
                at: p.at.0,
                supply_watts: p.supply_watts,
                draw_watts: p.draw_watts,
            })
            .filter(|p| p.at > oldest && p.at <= now)
            .collect(),
    }
}

/// The budgets that list one of `models` (`namespace/name` of the quota's
/// ModelDeployments) in `status.covered`, by name.
pub fn budgets_covering<'a>(
    budgets: &'a [Arc<EnergyBudget>],
    models: &[String],
) -> Vec<&'a EnergyBudget> {
    let mut v: Vec<&EnergyBudget> = budgets
        .iter()
        .map(|b| b.as_ref())
        .filter(|b| {
            b.status
                .as_ref()
                .is_some_and(|s| s.covered.iter().any(|c| models.contains(c)))
        })
        .collect();
    v.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    v
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn t(s: &str) -> Timestamp {
        s.parse().expect("time")
    }

    /// A quota as a gateway would have written it on 2 December 2026.
    pub fn quota() -> StintQuota {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "copyhold.dev/v1alpha1", "kind": "StintQuota",
            "metadata": {"name": "commons", "namespace": "town"},
            "spec": {
                "members": [
                    {"name": "ana", "apiKeySecret": {"name": "a"}, "stint": {"tokens": 10000}},
                    {"name": "bo", "apiKeySecret": {"name": "b"}, "stint": {"tokens": 4000, "energyWh": 2.0}},
                    {"name": "cy", "apiKeySecret": {"name": "c"}}
                ],
                "period": {"type": "calendar", "unit": "month", "timeZone": "Europe/Berlin"},
                "register": {"visibility": "public"}
            },
            "status": {
                "periodStart": "2026-11-30T23:00:00Z",
                "resetsAt": "2026-12-31T23:00:00Z",
                "members": [
                    {"name": "ana", "tokens": 4250, "promptTokens": 3000, "completionTokens": 1250,
                     "energyWh": 0.5, "requests": 12,
                     "history": [{"start": "2026-10-31T23:00:00Z", "end": "2026-11-30T23:00:00Z",
                                  "tokens": 9000, "energyWh": 1.5, "requests": 40}]},
                    {"name": "bo", "tokens": 4400, "energyWh": 1.0, "requests": 30},
                    {"name": "gone", "tokens": 99}
                ]
            }
        }))
        .expect("quota")
    }

    pub fn budget(name: &str, covered: &[&str]) -> EnergyBudget {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "copyhold.dev/v1alpha1", "kind": "EnergyBudget",
            "metadata": {"name": name},
            "spec": {"ceilingWatts": 2000, "supply": {"static": {"watts": 1000}}},
            "status": {
                "state": "PowerCapped", "supplyWatts": 900.0, "allowanceWatts": 720.0,
                "drawWatts": 700.0, "step": 1, "transitions": 1, "covered": covered,
                "lastEvaluated": "2026-12-02T11:59:50Z",
                "history": [
                    {"at": "2026-12-01T11:45:00Z", "supplyWatts": 5.0, "drawWatts": 5.0, "evaluations": 60},
                    {"at": "2026-12-02T06:00:00Z", "supplyWatts": 300.0, "drawWatts": 200.0, "evaluations": 60},
                    {"at": "2026-12-02T11:45:00Z", "supplyWatts": 900.0, "drawWatts": 700.0, "evaluations": 60}
                ]
            }
        }))
        .expect("budget")
    }

    #[test]
    fn members_follow_the_spec_with_percentages_of_their_stints() {
        let r = register(&quota(), &[], t("2026-12-02T12:00:00Z"));
        let names: Vec<&str> = r.members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            ["ana", "bo", "cy"],
            "spec order; removed members gone"
        );
        assert_eq!(r.members[0].tokens_percent, Some(42.5));
        assert_eq!(r.members[0].state, MemberState::Ok);
        // bo: 110 % of tokens, 50 % of energy; the larger decides.
        assert_eq!(r.members[1].tokens_percent, Some(110.0));
        assert_eq!(r.members[1].energy_percent, Some(50.0));
        assert_eq!(r.members[1].state, MemberState::Throttled);
        assert_eq!(r.members[2].tokens_percent, None, "no stint");
        assert_eq!(r.members[0].history[0].tokens, 9000);
        assert_eq!(r.period_start, Some(t("2026-11-30T23:00:00Z")));
        assert_eq!(r.time_zone, "Europe/Berlin");
        assert_eq!(r.visibility, RegisterVisibility::Public);
    }

    #[test]
    fn a_register_nobody_wrote_since_the_reset_shows_the_new_period() {
        let r = register(&quota(), &[], t("2027-01-02T12:00:00Z"));
        assert_eq!(r.members[0].tokens, 0);
        assert_eq!(r.members[1].state, MemberState::Ok);
        // December (what the status holds) closed into the history.
        let h: Vec<i64> = r.members[0].history.iter().map(|h| h.tokens).collect();
        assert_eq!(h, [9000, 4250]);
        assert_eq!(r.period_start, Some(t("2026-12-31T23:00:00Z")));
    }

    #[test]
    fn only_budgets_covering_the_registers_models_count_and_old_points_drop() {
        let all = [
            Arc::new(budget("solar", &["town/m"])),
            Arc::new(budget("elsewhere", &["village/m"])),
        ];
        let chosen = budgets_covering(&all, &["town/m".to_string()]);
        assert_eq!(chosen.len(), 1);
        let r = register(&quota(), &chosen, t("2026-12-02T12:00:00Z"));
        assert_eq!(r.energy[0].name, "solar");
        assert_eq!(r.energy[0].history.len(), 2, "the point 24 h ago is out");
        assert_eq!(r.energy[0].draw_watts, Some(700.0));
    }
}
