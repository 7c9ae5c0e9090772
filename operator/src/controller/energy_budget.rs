//! Reconcile one EnergyBudget every `evaluationInterval`: read the supply
//! and the covered nodes' draw, let `budget` decide, carry the decision out
//! (power limits through the nodes' admin endpoint, a `shed-to` annotation
//! on the ModelDeployments the ModelDeployment reconciler honours, the
//! `Deferring` condition the gateway reads), and report in the status, with
//! an Event and a metric for every step change.
//!
//! Everything the ladder needs to continue is kept in the status (step,
//! last change and its direction, since when headroom holds, the last good
//! supply reading), so a restarted or failed-over controller goes on where
//! the last one stopped.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use jiff::tz::TimeZone;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::Store;
use kube::{Client, Resource, ResourceExt};
use tracing::Instrument;

use super::FIELD_MANAGER;
use crate::conditions;
use crate::energy::budget::{
    self, DEFER_SAVING, Direction, FailSafe, Ladder, LadderState, Reading, Rung, RungWatts,
    cap_factor, draw_factor,
};
use crate::energy::draw::{self, EnginePod};
use crate::energy::overlap::{self, ShedWrite, Wish};
use crate::energy::supply;
use crate::energy::supply_schedule::Schedule;
use crate::error::{Error, Result};
use crate::metrics::{ControllerMetrics, EnergyMetrics, TransitionLabels};
use crate::resources::time::time;
use crate::resources::{
    EnergyBudget, EnergyBudgetSpec, EnergyBudgetStatus, ModelDeployment, Priority, parse_duration,
};
use crate::serving::workload::{SHED_BY_ANNOTATION, SHED_TO_ANNOTATION};

/// The finalizer this controller puts on the budgets it reconciles: a
/// deleted budget stays until its shed annotations and power limits are
/// undone (see `cleanup`).
pub const FINALIZER: &str = "copyhold.dev/energy-budget";

/// Field manager of the `shed-to`/`shed-by` annotations on
/// ModelDeployments: its own, so it never contends with anyone's spec.
pub const SHED_FIELD_MANAGER: &str = "copyhold-energy";

/// What every EnergyBudget reconciliation gets.
pub struct EnergyContext {
    pub client: Client,
    /// The ModelDeployment controller's recorder; budgets publish each
    /// Event on its own (see `publish`).
    pub recorder: Recorder,
    pub metrics: Arc<ControllerMetrics>,
    pub energy: Arc<EnergyMetrics>,
    pub http: reqwest::Client,
    pub nodes: Store<Node>,
    pub pods: Store<Pod>,
    pub model_deployments: Store<ModelDeployment>,
    /// Every budget this controller evaluates: who else covers a model,
    /// and what they shed (see `energy::overlap`). Empty until set.
    budgets: Option<Store<EnergyBudget>>,
    /// Only ModelDeployments of this namespace are shed (a namespaced
    /// install); all when `None`.
    pub watch_namespace: Option<String>,
    /// Power limits set, and refusals reported, per budget.
    capped: std::sync::Mutex<HashMap<String, CapMemory>>,
    /// The controller's `--node-admin-token-secret`: the Secret, in each
    /// Pod's own namespace, whose key `token` the nodes were started with.
    node_admin_token_secret: Option<String>,
    /// The power limit last decided, per budget (fraction of rated power):
    /// how the uncapped draw is estimated from the capped one.
    limits: std::sync::Mutex<HashMap<String, f64>>,
}

impl EnergyContext {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        recorder: Recorder,
        metrics: Arc<ControllerMetrics>,
        energy: Arc<EnergyMetrics>,
        nodes: Store<Node>,
        pods: Store<Pod>,
        model_deployments: Store<ModelDeployment>,
        watch_namespace: Option<String>,
    ) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Self {
            client,
            recorder,
            metrics,
            energy,
            http,
            nodes,
            pods,
            model_deployments,
            budgets: None,
            watch_namespace,
            capped: Default::default(),
            node_admin_token_secret: None,
            limits: Default::default(),
        }
    }

    /// The Secret (name, in each engine Pod's namespace, key `token`) the
    /// controller mounts into copyhold-node Pods: the token power caps send
    /// when a budget names no `adminTokenSecret` of its own.
    pub fn with_node_admin_token_secret(mut self, name: Option<String>) -> Self {
        self.node_admin_token_secret = name.filter(|n| !n.is_empty());
        self
    }

    /// The budgets' store, for overlaps between them.
    pub fn with_budgets(mut self, budgets: Store<EnergyBudget>) -> Self {
        self.budgets = Some(budgets);
        self
    }

    /// The other budgets (not being deleted) whose last status sheds the
    /// model `key`: their wishes, at the target every budget sheds it to.
    fn other_wishes(&self, me: &str, key: &str, target: i32) -> Vec<(String, i32)> {
        let Some(store) = &self.budgets else {
            return Vec::new();
        };
        store
            .state()
            .iter()
            .filter(|b| b.name_any() != me && b.metadata.deletion_timestamp.is_none())
            .filter(|b| {
                b.status
                    .as_ref()
                    .is_some_and(|s| s.shed.iter().any(|k| k == key))
            })
            .map(|b| (b.name_any(), target))
            .collect()
    }

    /// Those of `nodes` another budget covers while it caps power (power
    /// cap enabled, its ladder at the power-cap rung or deeper).
    fn capped_by_others(&self, me: &str, nodes: &BTreeSet<String>) -> BTreeSet<String> {
        let Some(store) = &self.budgets else {
            return BTreeSet::new();
        };
        let all = self.nodes.state();
        let mut out = BTreeSet::new();
        for b in store.state().iter().filter(|b| b.name_any() != me) {
            let capping =
                b.spec.policy.power_cap.enabled && b.status.as_ref().is_some_and(|s| s.step >= 1);
            if !capping {
                continue;
            }
            out.extend(
                all.iter()
                    .filter(|n| nodes.contains(&n.name_any()))
                    .filter(|n| draw::covers(&b.spec.node_selector, n))
                    .map(|n| n.name_any()),
            );
        }
        out
    }

    /// The models (`namespace/name`) with Pods on each budget's nodes, by
    /// budget name; `me` always appears, with `mine`.
    fn models_by_budget(
        &self,
        me: &str,
        mine: BTreeSet<String>,
        pods: &[Arc<Pod>],
    ) -> BTreeMap<String, BTreeSet<String>> {
        let mut out = BTreeMap::from([(me.to_string(), mine)]);
        let Some(store) = &self.budgets else {
            return out;
        };
        let nodes = self.nodes.state();
        for b in store.state().iter().filter(|b| b.name_any() != me) {
            let names: BTreeSet<String> = nodes
                .iter()
                .filter(|n| draw::covers(&b.spec.node_selector, n))
                .map(|n| n.name_any())
                .collect();
            out.insert(b.name_any(), models_on_nodes(pods, &names));
        }
        out
    }
}

/// What a budget's power caps have done, per engine Pod (`namespace/name`).
#[derive(Default, Clone, Debug)]
struct CapMemory {
    /// The limit (W) each Pod accepted.
    set: HashMap<String, f64>,
    /// The setting (a limit, or `None` for clearing) whose refusal was
    /// last reported: refusals are retried every evaluation but reported
    /// once per Pod and change.
    reported: HashMap<String, Option<f64>>,
    /// The limit (W) this budget itself set on each Pod (not another
    /// budget over the same node): what it may change or clear there.
    mine: HashMap<String, f64>,
}

/// Limit changes smaller than this fraction of a Pod's rated power are not
/// sent: the continuous cap moves by a percent now and then as the draw
/// wobbles, and re-sending that buys nothing (the allowance keeps the
/// hysteresis band free).
pub const POWER_LIMIT_DEAD_BAND: f64 = 0.02;

/// Whether a Pod whose accepted limit is `prev` must be sent `want`
/// (watts; `rated` the Pod's GPUs' rated power): always when it has none,
/// else only beyond the dead band.
pub fn power_limit_needs_update(prev: Option<f64>, want: f64, rated: f64) -> bool {
    match prev {
        None => true,
        Some(p) => (want - p).abs() >= (POWER_LIMIT_DEAD_BAND * rated).max(1.0),
    }
}

/// The Secret key holding the admin token of an engine Pod in `namespace`:
/// the budget's `adminTokenSecret` (in the Pod's namespace when it names
/// none), else the controller's `--node-admin-token-secret` (key `token`),
/// the very Secret mounted into the Pod as its `--admin-token-file`. `None`:
/// no token is sent.
pub fn admin_token_ref(
    policy: &crate::resources::PowerCapPolicy,
    node_secret: Option<&str>,
    namespace: &str,
) -> Option<crate::resources::SecretKeyRef> {
    match &policy.admin_token_secret {
        Some(r) => Some(crate::resources::SecretKeyRef {
            namespace: Some(r.namespace.clone().unwrap_or_else(|| namespace.to_string())),
            ..r.clone()
        }),
        None => node_secret.map(|name| crate::resources::SecretKeyRef {
            name: name.to_string(),
            namespace: Some(namespace.to_string()),
            key: crate::serving::workload::ADMIN_TOKEN_KEY.to_string(),
        }),
    }
}

/// What starts an evaluation outside the requeue: a spec change (its own
/// status writes must not), the finalizer put on, and the deletion.
pub fn trigger(eb: &EnergyBudget) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    eb.metadata.generation.hash(&mut h);
    eb.finalizers().hash(&mut h);
    eb.metadata.deletion_timestamp.is_some().hash(&mut h);
    Some(h.finish())
}

/// Failed reconciles are retried after a short delay.
pub fn error_policy(eb: Arc<EnergyBudget>, error: &Error, ctx: Arc<EnergyContext>) -> Action {
    ctx.metrics
        .reconcile_errors
        .get_or_create(&crate::metrics::ErrorLabels {
            kind: "EnergyBudget".into(),
            error: error.metric_label().into(),
        })
        .inc();
    tracing::warn!(name = %eb.name_any(), error = %error, "energy budget reconcile failed");
    Action::requeue(Duration::from_secs(5))
}

/// The reconciler.
pub async fn reconcile(eb: Arc<EnergyBudget>, ctx: Arc<EnergyContext>) -> Result<Action> {
    let started = Instant::now();
    let kind = ControllerMetrics::kind("EnergyBudget");
    ctx.metrics.reconciliations.get_or_create(&kind).inc();
    let span = tracing::info_span!("reconcile", kind = "EnergyBudget", name = %eb.name_any());
    let api: Api<EnergyBudget> = Api::all(ctx.client.clone());
    let result = finalizer(&api, FINALIZER, eb, |event| async {
        match event {
            Finalizer::Apply(eb) => reconcile_inner(&eb, &ctx).await,
            Finalizer::Cleanup(eb) => cleanup(&eb, &ctx).await,
        }
    })
    .instrument(span)
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics
        .reconcile_duration
        .get_or_create(&kind)
        .observe(started.elapsed().as_secs_f64());
    result
}

/// A covered ModelDeployment and what its Pods draw.
struct Covered {
    md: Arc<ModelDeployment>,
    key: String,
    running_pods: usize,
    pod_watts: f64,
}

impl Covered {
    fn per_pod(&self, fallback: f64) -> f64 {
        if self.running_pods > 0 {
            self.pod_watts / self.running_pods as f64
        } else {
            fallback
        }
    }
    fn ceiling(&self) -> i32 {
        ceiling_of(&self.md)
    }

    fn min_replicas(&self) -> i32 {
        min_replicas_of(&self.md)
    }
}

/// The most replicas the model may run: `spec.replicas`, or with
/// autoscaling up to `maxReplicas`. A shedding rung caps an autoscaled
/// model at its minimum even while it runs no more than that: else demand
/// could scale it up again in the middle of a shortage.
fn ceiling_of(md: &ModelDeployment) -> i32 {
    let spec = &md.spec;
    spec.autoscaling
        .as_ref()
        .map_or(spec.replicas, |a| a.max_replicas.max(spec.replicas))
}

/// `autoscaling.minReplicas`, 0 without autoscaling.
fn min_replicas_of(md: &ModelDeployment) -> i32 {
    md.spec
        .autoscaling
        .as_ref()
        .map_or(0, |a| a.min_replicas)
        .max(0)
}

/// The covered part of the cluster as read this evaluation.
struct Observed {
    /// The nodes the budget's selector covers.
    nodes: Vec<Arc<Node>>,
    /// Their running copyhold-node Pods.
    engine_pods: Vec<EnginePod>,
    /// What each engine Pod draws (W), by `namespace/name`.
    pod_watts: BTreeMap<String, f64>,
    /// The limit each node says is in force: what power caps compare with.
    pod_limits: HashMap<String, Option<f64>>,
    /// The covered ModelDeployments, by key.
    covered: Vec<Covered>,
    /// The covered nodes' draw.
    measured: draw::Draw,
    /// The models this budget shares with each other budget, by its name.
    shared: BTreeMap<String, Vec<String>>,
    /// Covered nodes that another budget covers and caps now.
    capped_by_others: BTreeSet<String>,
}

impl Observed {
    fn node_refs(&self) -> Vec<&Node> {
        self.nodes.iter().map(|n| n.as_ref()).collect()
    }

    /// Mean draw of a scraped engine Pod: the estimate for Pods not read.
    fn avg_pod(&self) -> f64 {
        if self.pod_watts.is_empty() {
            0.0
        } else {
            self.pod_watts.values().sum::<f64>() / self.pod_watts.len() as f64
        }
    }
}

/// The supply as this evaluation uses it.
struct SupplyNow {
    estimate: budget::SupplyEstimate,
    /// The last good reading and when it was taken.
    last_good: Option<(f64, Timestamp)>,
    /// Why the signal is stale (condition reason, message), if it is.
    stale: Option<(&'static str, String)>,
    allowance: f64,
}

/// What the ladder decided this evaluation, with the figures it read.
struct Decided {
    outcome: budget::Outcome,
    draw_w: f64,
    restore: RungWatts,
}

/// One evaluation: read the spec, observe the covered nodes and the
/// supply, let the ladder decide, carry the decision out (shed
/// annotations, power limits), then report (status, conditions, metrics,
/// Events).
async fn reconcile_inner(eb: &EnergyBudget, ctx: &EnergyContext) -> Result<Action> {
    let spec = &eb.spec;
    let now_time = conditions::now();
    let now = now_time.0;
    let old = eb.status.clone().unwrap_or_default();
    let mut status = EnergyBudgetStatus {
        conditions: old.conditions.clone(),
        observed_generation: eb.metadata.generation,
        ..old.clone()
    };
    let mut events: Vec<Event> = Vec::new();
    let interval = parse_duration(&spec.evaluation_interval).unwrap_or(Duration::from_secs(15));
    let (ladder, fail_safe) = match parse_spec(spec, interval) {
        Ok(v) => v,
        Err(message) => return refuse_invalid(eb, ctx, status, &message, &now_time).await,
    };

    let seen = observe(eb, ctx).await;
    let supply = read_supply(eb, ctx, &old, &fail_safe, now).await;
    let decided = decide(eb, ctx, &ladder, &old, &seen, &supply, now);
    if let Some(c) = decided.outcome.change {
        status.transitions += 1;
        events.push(report_change(
            ctx,
            &eb.name_any(),
            &ladder,
            c,
            decided.draw_w,
            supply.allowance,
        ));
    }
    let plan = carry_out(eb, ctx, &ladder, &seen, &decided, &mut events).await;

    let step = decided.outcome.state.step;
    let joules = fill_status(
        &mut status,
        eb,
        &old,
        &ladder,
        &seen,
        &supply,
        &decided,
        &plan,
        now,
        interval,
    );
    status.last_evaluated = Some(now_time.clone());
    set_conditions(
        &mut status,
        &mut events,
        &ladder,
        step,
        &supply,
        &fail_safe,
        decided.draw_w,
        &now_time,
    );
    let (value, reason, message) =
        unknown_products_condition(&draw::unknown_products(&seen.node_refs()));
    let generation = status.observed_generation;
    set_condition(
        &mut status,
        &mut events,
        "UnknownGpuProducts",
        value,
        reason,
        message,
        generation,
        &now_time,
    );
    let (value, reason, message) = overlap::overlapping_condition(&seen.shared);
    set_condition(
        &mut status,
        &mut events,
        "Overlapping",
        value,
        reason,
        message,
        generation,
        &now_time,
    );
    record_metrics(ctx, &eb.name_any(), &supply, decided.draw_w, step, joules);
    write_status(eb, ctx, &status).await?;
    publish(ctx, eb, events).await;
    Ok(Action::requeue(interval.max(Duration::from_secs(1))))
}

/// The ladder and the fail-safe from the spec's durations; without them
/// nothing can be decided. The error names the field as the API server
/// would.
fn parse_spec(spec: &EnergyBudgetSpec, interval: Duration) -> Result<(Ladder, FailSafe), String> {
    // Shed Pods take a while to stop: let a step down settle for two
    // evaluations (at least 10 s) before taking another.
    let ladder = Ladder::from_policy(&spec.policy)
        .map_err(|e| format!("spec.policy.dwell: Invalid value: {e}"))?
        .with_settle((interval * 2).max(Duration::from_secs(10)));
    let fail_safe = FailSafe {
        max_age: parse_duration(&spec.supply.max_age)
            .map_err(|e| format!("spec.supply.maxAge: Invalid value: {e}"))?,
        decay: parse_duration(&spec.supply.fail_safe_decay)
            .map_err(|e| format!("spec.supply.failSafeDecay: Invalid value: {e}"))?,
        floor_watts: spec.supply.floor_watts.max(0.0),
    };
    parse_duration(&spec.evaluation_interval)
        .map_err(|e| format!("spec.evaluationInterval: Invalid value: {e}"))?;
    Ok((ladder, fail_safe))
}

/// A spec that cannot be evaluated: `WithinBudget=False` with reason
/// `InvalidSpec` (an Event when it is new), and a look again in a minute.
async fn refuse_invalid(
    eb: &EnergyBudget,
    ctx: &EnergyContext,
    mut status: EnergyBudgetStatus,
    message: &str,
    now: &Time,
) -> Result<Action> {
    let mut events = Vec::new();
    if conditions::set(
        &mut status.conditions,
        "WithinBudget",
        false,
        "InvalidSpec",
        message,
        eb.metadata.generation,
        now.clone(),
    ) {
        events.push(warning("InvalidSpec", message.to_string(), "Evaluate"));
    }
    write_status(eb, ctx, &status).await?;
    publish(ctx, eb, events).await;
    Ok(Action::requeue(Duration::from_secs(60)))
}

/// Observe: the covered nodes, their engine Pods (scraped for draw and
/// limit), the nodes' draw (Prometheus when the spec names a query, else
/// the Pods' own gauges) and the covered ModelDeployments.
async fn observe(eb: &EnergyBudget, ctx: &EnergyContext) -> Observed {
    let spec = &eb.spec;
    let nodes: Vec<Arc<Node>> = ctx
        .nodes
        .state()
        .into_iter()
        .filter(|n| draw::covers(&spec.node_selector, n))
        .collect();
    let node_names: BTreeSet<String> = nodes.iter().map(|n| n.name_any()).collect();
    let pods = ctx.pods.state();
    let engine_pods = draw::engine_pods(pods.iter().map(|p| p.as_ref()), &node_names);
    let scraped = draw::scrape_with_limits(&ctx.http, &engine_pods).await;
    let pod_watts: BTreeMap<String, f64> =
        scraped.iter().map(|(k, r)| (k.clone(), r.watts)).collect();
    let pod_limits: HashMap<String, Option<f64>> = scraped
        .iter()
        .filter_map(|(k, r)| r.limit.map(|l| (k.clone(), l)))
        .collect();
    let readings = match &spec.draw.prometheus {
        Some(q) => match supply::prometheus_query(&ctx.http, q).await {
            Ok(samples) => draw::per_node_from_prometheus(&samples),
            Err(e) => {
                tracing::warn!(error = %e, "draw query failed; nodes count at their assumed power");
                BTreeMap::new()
            }
        },
        None => per_node(&engine_pods, &pod_watts),
    };
    let node_refs: Vec<&Node> = nodes.iter().map(|n| n.as_ref()).collect();
    let engine_nodes: BTreeSet<String> = engine_pods.iter().map(|p| p.node.clone()).collect();
    let measured = draw::total(&node_refs, &readings, &engine_nodes, &spec.draw);
    let covered = covered_deployments(eb, ctx, &pods, &node_names, &engine_pods, &pod_watts);
    let name = eb.name_any();
    let by_budget = ctx.models_by_budget(&name, models_on_nodes(&pods, &node_names), &pods);
    let shared = overlap::shared_models(&name, &by_budget);
    let capped_by_others = ctx.capped_by_others(&name, &node_names);
    Observed {
        shared,
        capped_by_others,
        nodes,
        engine_pods,
        pod_watts,
        pod_limits,
        covered,
        measured,
    }
}

/// The models (`namespace/name`) with a Pod on one of `nodes`.
fn models_on_nodes(pods: &[Arc<Pod>], nodes: &BTreeSet<String>) -> BTreeSet<String> {
    pods.iter()
        .filter(|p| {
            p.spec
                .as_ref()
                .and_then(|s| s.node_name.as_ref())
                .is_some_and(|n| nodes.contains(n))
        })
        .filter_map(|p| {
            let md = p.labels().get(crate::serving::workload::MD_LABEL)?;
            Some(format!("{}/{md}", p.namespace().unwrap_or_default()))
        })
        .collect()
}

/// The engine Pods' draw summed per node.
fn per_node(engine_pods: &[EnginePod], pod_watts: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    let mut per_node = BTreeMap::new();
    for p in engine_pods {
        if let Some(w) = pod_watts.get(&p.key) {
            *per_node.entry(p.node.clone()).or_insert(0.0) += w;
        }
    }
    per_node
}

/// The ModelDeployments the budget covers: those with Pods on the covered
/// nodes, and those it sheds (which may have none left there), in key
/// order, with what their Pods draw.
fn covered_deployments(
    eb: &EnergyBudget,
    ctx: &EnergyContext,
    pods: &[Arc<Pod>],
    node_names: &BTreeSet<String>,
    engine_pods: &[EnginePod],
    pod_watts: &BTreeMap<String, f64>,
) -> Vec<Covered> {
    let name = eb.name_any();
    let in_scope = |md: &ModelDeployment| {
        ctx.watch_namespace
            .as_deref()
            .is_none_or(|ns| md.namespace().as_deref() == Some(ns))
    };
    let mut covered: Vec<Covered> = Vec::new();
    for md in ctx.model_deployments.state().iter().filter(|m| in_scope(m)) {
        let key = format!("{}/{}", md.namespace().unwrap_or_default(), md.name_any());
        let on_nodes = pods.iter().any(|p| {
            p.namespace() == md.namespace()
                && p.labels().get(crate::serving::workload::MD_LABEL) == Some(&md.name_any())
                && p.spec
                    .as_ref()
                    .and_then(|s| s.node_name.as_ref())
                    .is_some_and(|n| node_names.contains(n))
        });
        let shed_by_us = md.annotations().get(SHED_BY_ANNOTATION) == Some(&name);
        if !on_nodes && !shed_by_us {
            continue;
        }
        let mine: Vec<&EnginePod> = engine_pods
            .iter()
            .filter(|p| p.model_deployment.as_deref() == Some(key.as_str()))
            .collect();
        covered.push(Covered {
            md: md.clone(),
            key,
            running_pods: mine
                .iter()
                .filter(|p| pod_watts.contains_key(&p.key))
                .count(),
            pod_watts: mine.iter().filter_map(|p| pod_watts.get(&p.key)).sum(),
        });
    }
    covered.sort_by(|a, b| a.key.cmp(&b.key));
    covered
}

/// The supply, with the fail-safe when the signal fails, and the allowance
/// it leaves.
async fn read_supply(
    eb: &EnergyBudget,
    ctx: &EnergyContext,
    old: &EnergyBudgetStatus,
    fail_safe: &FailSafe,
    now: Timestamp,
) -> SupplyNow {
    let spec = &eb.spec;
    let last_good_before = old
        .last_good_supply_watts
        .zip(old.supply_observed_at.as_ref().map(|t| t.0));
    let read = supply::read(spec, now, &ctx.client, &ctx.http).await;
    // Freshness runs from when the reading was taken, by its source's
    // clock; an answer older than the kept reading does not replace it.
    let last_good = match &read {
        Ok(r) => match last_good_before {
            Some((w, at)) if at > r.at => Some((w, at)),
            _ => Some((r.watts, r.at)),
        },
        Err(_) => last_good_before,
    };
    let estimate = fail_safe.supply(last_good, now);
    let stale = match (&read, last_good) {
        (Err(e), _) => Some((e.reason(), e.to_string())),
        (Ok(_), Some((_, at))) if estimate.stale => Some((
            "Stale",
            format!("the last reading was taken at {at}, longer than maxAge ago"),
        )),
        // An Ok reading always leaves a last good one.
        (Ok(_), _) => None,
    };
    let allowance = budget::allowance(spec.ceiling_watts, estimate.watts, spec.margin_percent);
    SupplyNow {
        estimate,
        last_good,
        stale,
        allowance,
    }
}

/// What each rung would save now, and what undoing it would restore (W),
/// from the measured draw and the covered ModelDeployments' Pods. Pure.
fn rung_estimates(
    spec: &EnergyBudgetSpec,
    covered: &[Covered],
    draw_w: f64,
    avg_pod: f64,
) -> (RungWatts, RungWatts) {
    let cap = cap_factor(spec.policy.power_cap.min_percent);
    let mut savings = RungWatts::default();
    let mut restore = RungWatts::default();
    savings.set(Rung::PowerCap, draw_w * (1.0 - cap));
    restore.set(Rung::PowerCap, draw_w * (1.0 / cap - 1.0));
    for (rung, prio) in [
        (Rung::ShedDeferrable, Priority::Deferrable),
        (Rung::ShedStandard, Priority::Standard),
    ] {
        let (mut save, mut back) = (0.0, 0.0);
        for c in covered.iter().filter(|c| c.md.spec.priority == prio) {
            let cut = (c.ceiling() - c.min_replicas()).max(0) as f64;
            let running = crate::serving::workload::effective_replicas(&c.md).0;
            let shed = (c.md.spec.replicas - running).max(0) as f64;
            let per = c.per_pod(avg_pod);
            save += ((running - c.min_replicas()).max(0) as f64).min(cut) * per;
            back += shed * per;
        }
        savings.set(rung, save);
        restore.set(rung, back);
    }
    let deferrable_w: f64 = covered
        .iter()
        .filter(|c| c.md.spec.priority == Priority::Deferrable)
        .map(|c| c.pod_watts)
        .sum();
    savings.set(Rung::Defer, deferrable_w * DEFER_SAVING);
    restore.set(
        Rung::Defer,
        deferrable_w * DEFER_SAVING / (1.0 - DEFER_SAVING),
    );
    (savings, restore)
}

/// The ladder's state as the status keeps it.
fn ladder_state(old: &EnergyBudgetStatus) -> LadderState {
    LadderState {
        step: u8::try_from(old.step.clamp(0, 4)).unwrap_or(0),
        last_change: old.last_step_change.as_ref().map(|t| t.0),
        last_direction: old
            .last_step_direction
            .as_deref()
            .and_then(Direction::parse),
        headroom_since: old.headroom_since.as_ref().map(|t| t.0),
    }
}

/// Decide: let the ladder evaluate the draw against the allowance, and
/// remember the power limit it chose (the next evaluation undoes it to
/// estimate the uncapped draw).
fn decide(
    eb: &EnergyBudget,
    ctx: &EnergyContext,
    ladder: &Ladder,
    old: &EnergyBudgetStatus,
    seen: &Observed,
    supply: &SupplyNow,
    now: Timestamp,
) -> Decided {
    let name = eb.name_any();
    let draw_w = seen.measured.total_watts;
    let (savings, mut restore) = rung_estimates(&eb.spec, &seen.covered, draw_w, seen.avg_pod());
    let state = ladder_state(old);
    let mut limits = ctx.limits.lock().unwrap_or_else(|p| p.into_inner());
    // What the nodes would draw uncapped: the draw read, undone by the
    // limit last set (`minPercent` when not known, e.g. after a restart,
    // which overestimates it and so caps harder).
    let uncapped = if ladder.in_force(state.step, Rung::PowerCap) {
        draw_w / draw_factor(limits.get(&name).copied().unwrap_or(ladder.min_cap))
    } else {
        draw_w
    };
    // The ladder reads the restore estimates of the rungs above the cap in
    // uncapped watts; the Pods' draw was measured under the limit.
    if draw_w > 0.0 {
        for r in [Rung::ShedDeferrable, Rung::ShedStandard, Rung::Defer] {
            restore.set(r, restore.get(r) * uncapped / draw_w);
        }
    }
    let outcome = ladder.evaluate(
        &state,
        &Reading {
            now,
            allowance: supply.allowance,
            draw: draw_w,
            savings,
            restore,
            uncapped: Some(uncapped),
        },
    );
    match outcome.cap {
        Some(f) => limits.insert(name, f),
        None => limits.remove(&name),
    };
    Decided {
        outcome,
        draw_w,
        restore,
    }
}

/// Report a step change: the transitions metric, a log line, and an Event
/// naming the rungs taken or undone (Warning going down).
fn report_change(
    ctx: &EnergyContext,
    name: &str,
    ladder: &Ladder,
    c: budget::StepChange,
    draw_w: f64,
    allowance: f64,
) -> Event {
    ctx.energy
        .transitions
        .get_or_create(&TransitionLabels {
            budget: name.to_string(),
            direction: c.direction.as_str().into(),
        })
        .inc();
    let (reason, note) = change_note(ladder, c, draw_w, allowance);
    tracing::info!(budget = %name, %note, "ladder step change");
    Event {
        type_: if c.direction == Direction::Down {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.into(),
        note: Some(note),
        action: "Ladder".into(),
        secondary: None,
    }
}

/// The Event reason and note of a step change. Pure.
pub fn change_note(
    ladder: &Ladder,
    c: budget::StepChange,
    draw_w: f64,
    allowance: f64,
) -> (&'static str, String) {
    let (higher, lower) = match c.direction {
        Direction::Down => (c.to, c.from),
        Direction::Up => (c.from, c.to),
    };
    let what = ladder
        .active(higher)
        .filter(|r| r.step() > lower)
        .map(Rung::describe)
        .collect::<Vec<_>>()
        .join(", ");
    match c.direction {
        Direction::Down => (
            "StepDown",
            format!(
                "step {} → {}: {what}; draw {draw_w:.0} W over allowance {allowance:.0} W",
                c.from, c.to
            ),
        ),
        Direction::Up => (
            "StepUp",
            format!(
                "step {} → {}: undone: {what}; headroom held for the dwell (draw {draw_w:.0} W, allowance {allowance:.0} W)",
                c.from, c.to
            ),
        ),
    }
}

/// Act: annotate the ModelDeployments to shed (and clear those no longer
/// shed), then set or clear the power limits. Failures are Events. Returns
/// the shed plan (replicas to run, by key).
async fn carry_out(
    eb: &EnergyBudget,
    ctx: &EnergyContext,
    ladder: &Ladder,
    seen: &Observed,
    decided: &Decided,
    events: &mut Vec<Event>,
) -> BTreeMap<String, i32> {
    let name = eb.name_any();
    let sheddable: Vec<budget::Sheddable> = seen
        .covered
        .iter()
        .map(|c| budget::Sheddable {
            key: c.key.clone(),
            priority: c.md.spec.priority,
            replicas: c.ceiling(),
            min_replicas: c.min_replicas(),
        })
        .collect();
    let plan: BTreeMap<String, i32> =
        budget::shed_plan(ladder, decided.outcome.state.step, &sheddable)
            .into_iter()
            .collect();
    for c in &seen.covered {
        let want = plan.get(&c.key).copied();
        let target = budget::shed_target(c.min_replicas(), c.ceiling());
        let others = ctx.other_wishes(&name, &c.key, target);
        if let Err(e) = govern_shed(ctx, &c.md, &name, want, &others).await {
            events.push(warning(
                "ShedFailed",
                format!("annotating {}: {e}", c.key),
                "Shed",
            ));
        }
    }
    // A budget without the power cap only clears what it set itself (it
    // was switched off while capping); with it, it owns the covered Pods'
    // limits.
    let no_limits = HashMap::new();
    let pod_limits = if eb.spec.policy.power_cap.enabled {
        &seen.pod_limits
    } else {
        &no_limits
    };
    let power_events = power_caps(
        ctx,
        eb,
        &seen.engine_pods,
        &seen.node_refs(),
        pod_limits,
        decided.outcome.cap,
        &seen.capped_by_others,
    )
    .await;
    events.extend(power_events);
    plan
}

/// Report in the status's figures: the ladder's state, supply, allowance,
/// draw, what is covered and shed, today's energy and, while deferring,
/// when to retry. Returns the joules drawn since the last evaluation.
#[allow(clippy::too_many_arguments)]
fn fill_status(
    status: &mut EnergyBudgetStatus,
    eb: &EnergyBudget,
    old: &EnergyBudgetStatus,
    ladder: &Ladder,
    seen: &Observed,
    supply: &SupplyNow,
    decided: &Decided,
    plan: &BTreeMap<String, i32>,
    now: Timestamp,
    interval: Duration,
) -> f64 {
    let spec = &eb.spec;
    let (outcome, draw_w) = (&decided.outcome, decided.draw_w);
    let step = outcome.state.step;
    status.step = i32::from(step);
    status.state = Some(budget::state_of(step).to_string());
    status.last_step_change = outcome.state.last_change.map(time);
    status.last_step_direction = outcome.state.last_direction.map(|d| d.as_str().to_string());
    status.headroom_since = outcome.state.headroom_since.map(time);
    status.supply_watts = Some(round(supply.estimate.watts));
    status.allowance_watts = Some(round(supply.allowance));
    status.draw_watts = Some(round(draw_w));
    status.headroom_watts = Some(round(supply.allowance - draw_w));
    crate::energy::history::record(&mut status.history, now, supply.estimate.watts, draw_w);
    if let Some((w, at)) = supply.last_good {
        status.last_good_supply_watts = Some(round(w));
        status.supply_observed_at = Some(time(at));
    }
    status.covered = seen.covered.iter().map(|c| c.key.clone()).collect();
    status.shed = plan.keys().cloned().collect();
    status.nodes_without_reading = seen.measured.without_reading.clone();
    let schedule = spec
        .supply
        .schedule
        .as_ref()
        .and_then(|s| Schedule::new(s).ok());
    let tz = schedule.as_ref().map_or(TimeZone::UTC, Schedule::time_zone);
    let (today, joules) = budget::EnergyToday {
        energy_wh: old.energy_today_wh.unwrap_or(0.0),
        renewable_wh: old.renewable_today_wh.unwrap_or(0.0),
    }
    .advance(
        old.last_evaluated.as_ref().map(|t| t.0),
        now,
        draw_w,
        supply.estimate.watts,
        tz,
        interval * 4,
    );
    status.energy_today_wh = Some(round(today.energy_wh));
    status.renewable_today_wh = Some(round(today.renewable_wh));
    status.retry_after_seconds = ladder.in_force(step, Rung::Defer).then(|| {
        ladder.retry_after(
            &outcome.state,
            now,
            draw_w + decided.restore.get(Rung::Defer),
            schedule
                .as_ref()
                .map(|s| (s, spec.ceiling_watts, spec.margin_percent)),
        )
    });
    joules
}

/// The four conditions as (status, reason, message): `WithinBudget`,
/// `Shedding`, `Deferring`, `SupplyStale`. Pure.
fn condition_values(
    status: &EnergyBudgetStatus,
    ladder: &Ladder,
    step: u8,
    supply: &SupplyNow,
    fail_safe: &FailSafe,
    draw_w: f64,
) -> [(&'static str, bool, &'static str, String); 4] {
    let allowance = supply.allowance;
    let within = draw_w <= allowance;
    let within = if within {
        (
            within,
            "WithinAllowance",
            format!("draw {draw_w:.0} W within allowance {allowance:.0} W"),
        )
    } else {
        (
            within,
            "OverAllowance",
            format!("draw {draw_w:.0} W over allowance {allowance:.0} W"),
        )
    };
    let shedding = [Rung::ShedStandard, Rung::ShedDeferrable]
        .into_iter()
        .find(|r| ladder.in_force(step, *r));
    let shed = status.shed.join(", ");
    let shedding = match shedding {
        Some(Rung::ShedStandard) => (
            true,
            "ShedStandard",
            format!("deferrable and standard replicas shed: {shed}"),
        ),
        Some(_) => (
            true,
            "ShedDeferrable",
            format!("deferrable replicas shed: {shed}"),
        ),
        None => (false, "NotShedding", "no replicas shed".to_string()),
    };
    let deferring = if ladder.in_force(step, Rung::Defer) {
        (
            true,
            "SupplyShort",
            format!(
                "deferrable requests are answered 503; retry after {} s",
                status.retry_after_seconds.unwrap_or(0)
            ),
        )
    } else {
        (false, "NotDeferring", "requests are served".to_string())
    };
    let watts = supply.estimate.watts;
    let stale = match &supply.stale {
        Some((reason, why)) => (
            true,
            *reason,
            format!(
                "{why}; using the fail-safe supply {watts:.0} W (floor {:.0} W)",
                fail_safe.floor_watts
            ),
        ),
        None => (false, "Fresh", format!("supply {watts:.0} W")),
    };
    [
        ("WithinBudget", within.0, within.1, within.2),
        ("Shedding", shedding.0, shedding.1, shedding.2),
        ("Deferring", deferring.0, deferring.1, deferring.2),
        ("SupplyStale", stale.0, stale.1, stale.2),
    ]
}

/// The `UnknownGpuProducts` condition: true, naming them, when covered
/// nodes carry GPU products missing from the catalog (counted at the
/// highest power of their memory class). Pure.
fn unknown_products_condition(unknown: &[String]) -> (bool, &'static str, String) {
    if unknown.is_empty() {
        (
            false,
            "AllProductsKnown",
            "every covered GPU product is in the catalog".to_string(),
        )
    } else {
        (
            true,
            "ProductsNotInCatalog",
            format!(
                "GPU products not in the catalog, counted at the highest rated power of their memory class: {}",
                unknown.join(", ")
            ),
        )
    }
}

/// Report the four conditions; each flip is an Event, and so is a new
/// cause of staleness even without a flip.
#[allow(clippy::too_many_arguments)]
fn set_conditions(
    status: &mut EnergyBudgetStatus,
    events: &mut Vec<Event>,
    ladder: &Ladder,
    step: u8,
    supply: &SupplyNow,
    fail_safe: &FailSafe,
    draw_w: f64,
    now: &Time,
) {
    let generation = status.observed_generation;
    let before = conditions::get(&status.conditions, "SupplyStale").map(|c| c.reason.clone());
    for (type_, value, reason, message) in
        condition_values(status, ladder, step, supply, fail_safe, draw_w)
    {
        let stale_news =
            type_ == "SupplyStale" && value && before.as_deref().is_some_and(|b| b != reason);
        set_condition(
            status,
            events,
            type_,
            value,
            reason,
            message.clone(),
            generation,
            now,
        );
        if stale_news && !events.iter().any(|e| e.reason == "SupplyStale") {
            events.push(warning("SupplyStale", message, "ReadSupply"));
        }
    }
}

/// The budget's gauges and its energy counter.
fn record_metrics(
    ctx: &EnergyContext,
    name: &str,
    supply: &SupplyNow,
    draw_w: f64,
    step: u8,
    joules: f64,
) {
    let labels = EnergyMetrics::budget(name);
    let e = &ctx.energy;
    e.supply_watts
        .get_or_create(&labels)
        .set(supply.estimate.watts);
    e.allowance_watts
        .get_or_create(&labels)
        .set(supply.allowance);
    e.draw_watts.get_or_create(&labels).set(draw_w);
    e.ladder_step.get_or_create(&labels).set(i64::from(step));
    e.energy_joules.get_or_create(&labels).inc_by(joules);
}

fn round(w: f64) -> f64 {
    (w * 10.0).round() / 10.0
}

fn warning(reason: &str, note: String, action: &str) -> Event {
    Event {
        type_: EventType::Warning,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: action.into(),
        secondary: None,
    }
}

/// Set a condition; a flip becomes an Event named after the condition
/// (Warning when it turns bad).
#[allow(clippy::too_many_arguments)]
fn set_condition(
    status: &mut EnergyBudgetStatus,
    events: &mut Vec<Event>,
    type_: &str,
    value: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) {
    let existed = conditions::get(&status.conditions, type_).is_some();
    let flipped = conditions::set(
        &mut status.conditions,
        type_,
        value,
        reason,
        message.clone(),
        generation,
        now.clone(),
    );
    // A budget's first evaluation reports only what is wrong.
    let bad = if type_ == "WithinBudget" {
        !value
    } else {
        value
    };
    if flipped && (existed || bad) {
        let event_reason = if value {
            type_.to_string()
        } else {
            format!("Not{type_}")
        };
        events.push(Event {
            type_: if bad {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: event_reason,
            note: Some(format!("{reason}: {message}").chars().take(1000).collect()),
            action: "Evaluate".into(),
            secondary: None,
        });
    }
}

async fn write_status(
    eb: &EnergyBudget,
    ctx: &EnergyContext,
    status: &EnergyBudgetStatus,
) -> Result<()> {
    if Some(status) == eb.status.as_ref() {
        return Ok(());
    }
    let api: Api<EnergyBudget> = Api::all(ctx.client.clone());
    let patch = serde_json::json!({
        "apiVersion": "copyhold.dev/v1alpha1",
        "kind": "EnergyBudget",
        "status": status,
    });
    api.patch_status(
        &eb.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    ctx.metrics
        .api_writes
        .get_or_create(&ControllerMetrics::kind("EnergyBudgetStatus"))
        .inc();
    Ok(())
}

async fn publish(ctx: &EnergyContext, eb: &EnergyBudget, events: Vec<Event>) {
    // Events of a cluster-scoped object live in `default`; API servers
    // before 1.22 refuse one whose object names no namespace there.
    let mut reference = eb.object_ref(&());
    reference.namespace = Some("default".into());
    for ev in events {
        // kube's Recorder folds every Event of one reason about one object
        // into the first one's series for six minutes, keeping the first
        // note: a PowerCapFailed or SupplyStale with a new cause would show
        // the old one. A budget publishes only on changes, so each Event
        // stands on its own (a fresh Recorder has nothing to fold into).
        let recorder = Recorder::new(
            ctx.client.clone(),
            Reporter {
                controller: "copyhold".into(),
                instance: None,
            },
        );
        if let Err(e) = recorder.publish(&ev, &reference).await {
            tracing::warn!(error = %e, reason = %ev.reason, "publishing an event failed");
        }
    }
}

/// Write what `energy::overlap` decides for budget `me` on `md`'s shed
/// annotations: its own wish, a hand-over to another budget that still
/// sheds it, a clearing, or nothing (another budget governs, or nothing
/// changed).
async fn govern_shed(
    ctx: &EnergyContext,
    md: &ModelDeployment,
    me: &str,
    want: Option<i32>,
    others: &[(String, i32)],
) -> Result<()> {
    let ann = md.annotations();
    let held_to = ann
        .get(SHED_TO_ANNOTATION)
        .and_then(|t| t.parse::<i32>().ok());
    let held = match (ann.get(SHED_BY_ANNOTATION), held_to) {
        (Some(by), Some(to)) => Some(Wish {
            budget: by.as_str(),
            replicas: to,
        }),
        // A shed-by without a readable shed-to: held by that budget at
        // no replicas, so a budget's own garbled annotation is rewritten.
        (Some(by), None) => Some(Wish {
            budget: by.as_str(),
            replicas: i32::MIN,
        }),
        (None, _) => None,
    };
    let others: Vec<Wish<'_>> = others
        .iter()
        .map(|(b, r)| Wish {
            budget: b.as_str(),
            replicas: *r,
        })
        .collect();
    let write = overlap::shed_write(me, want, held, &others);
    if write == ShedWrite::Keep {
        return Ok(());
    }
    let ns = md
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let api: Api<ModelDeployment> = Api::namespaced(ctx.client.clone(), &ns);
    match write {
        ShedWrite::Set { by, to } => {
            let patch = serde_json::json!({
                "apiVersion": "copyhold.dev/v1alpha1",
                "kind": "ModelDeployment",
                "metadata": {
                    "name": md.name_any(),
                    "namespace": ns,
                    "annotations": {SHED_TO_ANNOTATION: to.to_string(), SHED_BY_ANNOTATION: by},
                },
            });
            api.patch(
                &md.name_any(),
                &PatchParams::apply(SHED_FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await?;
        }
        ShedWrite::Clear | ShedWrite::Keep => {
            let merge = serde_json::json!({"metadata": {"annotations": {SHED_TO_ANNOTATION: null, SHED_BY_ANNOTATION: null}}});
            api.patch(
                &md.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&merge),
            )
            .await?;
        }
    }
    ctx.metrics
        .api_writes
        .get_or_create(&ControllerMetrics::kind("ModelDeployment"))
        .inc();
    Ok(())
}

/// Set power limits (`limit` × the node GPUs' rated power) on the engine
/// Pods of the covered nodes, or clear them (`None`). Failures are Events
/// (once per Pod and change), never errors; a refused setting is tried
/// again at the next evaluation. `reported` is the limit each Pod's
/// `/metrics` says is in force: it overrides what this process remembers,
/// so a restarted engine gets its limit again, and a limit left by an
/// earlier controller (or set by hand) is cleared once the cap is lifted.
async fn power_caps(
    ctx: &EnergyContext,
    eb: &EnergyBudget,
    pods: &[EnginePod],
    nodes: &[&Node],
    reported: &HashMap<String, Option<f64>>,
    limit: Option<f64>,
    capped_by_others: &BTreeSet<String>,
) -> Vec<Event> {
    let name = eb.name_any();
    let policy = &eb.spec.policy.power_cap;
    let per_gpu: HashMap<String, f64> = nodes
        .iter()
        .map(|n| (n.name_any(), draw::rated_per_gpu(n)))
        .collect();
    let memory: CapMemory = {
        let mut all = ctx.capped.lock().unwrap_or_else(|p| p.into_inner());
        let entry = all.entry(name.clone()).or_default();
        // The nodes know best; Pods that went away take their limits along.
        for (key, l) in reported {
            match l {
                Some(w) => entry.set.insert(key.clone(), *w),
                None => entry.set.remove(key),
            };
        }
        entry.set.retain(|k, _| pods.iter().any(|p| &p.key == k));
        entry.mine.retain(|k, _| pods.iter().any(|p| &p.key == k));
        entry.clone()
    };
    let mut work: Vec<(&EnginePod, Option<f64>)> = Vec::new();
    if let Some(limit) = limit {
        for p in pods {
            let rated = per_gpu.get(&p.node).copied().unwrap_or(0.0) * p.gpus.max(1.0);
            if rated <= 0.0 {
                continue;
            }
            let w = (rated * limit).round();
            if yields(&memory, p, Some(w), capped_by_others) {
                continue;
            }
            if power_limit_needs_update(memory.set.get(&p.key).copied(), w, rated) {
                work.push((p, Some(w)));
            }
        }
    } else {
        for p in pods.iter().filter(|p| memory.set.contains_key(&p.key)) {
            if !yields(&memory, p, None, capped_by_others) {
                work.push((p, None));
            }
        }
    }
    let mut events = Vec::new();
    if work.is_empty() {
        if limit.is_none() {
            // Nothing left to clear (Pods that went away took their limits).
            ctx.capped
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&name);
        }
        return events;
    }
    let mut tokens = Tokens::new();
    let mut accepted: Vec<(String, Option<f64>)> = Vec::new();
    let mut refused: Vec<(String, Option<f64>, String)> = Vec::new();
    for (p, watts) in work {
        match send_limit(ctx, policy, p, watts, &mut tokens).await {
            Ok(()) => accepted.push((p.key.clone(), watts)),
            Err(why) => refused.push((p.key.clone(), watts, why)),
        }
    }
    let mut all = ctx.capped.lock().unwrap_or_else(|p| p.into_inner());
    let entry = all.entry(name).or_default();
    for (key, w) in accepted {
        match w {
            Some(w) => {
                entry.mine.insert(key.clone(), w);
                entry.set.insert(key.clone(), w)
            }
            None => {
                entry.mine.remove(&key);
                entry.set.remove(&key)
            }
        };
        entry.reported.remove(&key);
    }
    for (key, w, why) in refused {
        if entry.reported.get(&key) != Some(&w) {
            let what = match w {
                Some(w) => format!("setting {w:.0} W"),
                None => "clearing the limit".to_string(),
            };
            events.push(warning(
                "PowerCapFailed",
                format!("{key}: {what}: {why}"),
                "PowerCap",
            ));
            entry.reported.insert(key, w);
        }
    }
    events
}

/// Whether this budget leaves Pod `p`'s limit to another budget that caps
/// its node too (see `overlap::cap_yields`).
fn yields(
    memory: &CapMemory,
    p: &EnginePod,
    want: Option<f64>,
    capped_by_others: &BTreeSet<String>,
) -> bool {
    overlap::cap_yields(
        want,
        memory.set.get(&p.key).copied(),
        memory.mine.get(&p.key).copied(),
        capped_by_others.contains(&p.node),
    )
}

/// Admin tokens, read once per Secret (namespace, name, key) per pass.
type Tokens = HashMap<(String, String, String), Result<String, String>>;

/// Send one engine Pod its power limit (`None` clears it) with the admin
/// token `policy` names for its namespace; why it was refused otherwise.
async fn send_limit(
    ctx: &EnergyContext,
    policy: &crate::resources::PowerCapPolicy,
    p: &EnginePod,
    watts: Option<f64>,
    tokens: &mut Tokens,
) -> Result<(), String> {
    let namespace = p.key.split_once('/').map_or("", |(ns, _)| ns);
    let token = match admin_token_ref(policy, ctx.node_admin_token_secret.as_deref(), namespace) {
        None => None,
        Some(r) => {
            let id = (
                r.namespace.clone().unwrap_or_default(),
                r.name.clone(),
                r.key.clone(),
            );
            if !tokens.contains_key(&id) {
                let t = supply::read_secret(&ctx.client, &r, None)
                    .await
                    .map_err(|e| e.to_string());
                tokens.insert(id.clone(), t);
            }
            match tokens.get(&id) {
                Some(Ok(t)) => Some(t.clone()),
                Some(Err(e)) => return Err(format!("admin token: {e}")),
                None => None,
            }
        }
    };
    let mut req = ctx
        .http
        .post(format!("{}/admin/power-limit", p.base_url))
        .json(&serde_json::json!({"watts": watts}))
        .timeout(Duration::from_secs(5));
    if let Some(t) = &token {
        req = req.bearer_auth(t);
    }
    match req.send().await {
        Ok(r) if r.status().is_success() => Ok(()),
        Ok(r) => {
            let status = r.status();
            let body: String = r
                .text()
                .await
                .unwrap_or_default()
                .chars()
                .take(200)
                .collect();
            Err(format!("HTTP {status}: {body}"))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// The ModelDeployments (`namespace/name`) a deleted budget `budget` must
/// give back: those its `shed-by` annotation names.
pub fn shed_by<'a>(
    budget: &str,
    mds: impl IntoIterator<Item = &'a ModelDeployment>,
) -> Vec<String> {
    let mut out: Vec<String> = mds
        .into_iter()
        .filter(|md| md.annotations().get(SHED_BY_ANNOTATION).map(String::as_str) == Some(budget))
        .map(|md| format!("{}/{}", md.namespace().unwrap_or_default(), md.name_any()))
        .collect();
    out.sort();
    out
}

/// The running engine Pods whose power limit a deleted budget may have
/// set: those it remembers setting, and, when it owns the covered Pods'
/// limits (its power cap is enabled), every Pod on a covered node (after a
/// controller restart the memory is gone; the nodes still know).
pub fn cap_candidates(
    pods: &[EnginePod],
    remembered: &std::collections::HashSet<String>,
    covered_nodes: &BTreeSet<String>,
    owns_covered: bool,
) -> Vec<EnginePod> {
    pods.iter()
        .filter(|p| {
            remembered.contains(&p.key) || (owns_covered && covered_nodes.contains(&p.node))
        })
        .cloned()
        .collect()
}

/// Whether a candidate Pod is cleared: unless its `/metrics` says it has
/// no limit (one that cannot be read, or does not say, is cleared: a
/// `null` limit is harmless where none is set).
pub fn needs_clearing(reading: Option<&draw::PodReading>) -> bool {
    !matches!(reading.map(|r| r.limit), Some(Some(None)))
}

/// A deleted budget gives back what it changed outside itself: the
/// ModelDeployments it shed get their replicas back (its `shed-to`/
/// `shed-by` annotations removed, as a step up removes them), and the
/// engine Pods it capped lose their limit. A failed API write is an error
/// (retried; the finalizer stays); a Pod that refuses or cannot be reached
/// is a `PowerCapFailed` Event and does not hold the deletion up (a Pod
/// that is gone has no limit left; one that is unreachable would block the
/// deletion for ever).
async fn cleanup(eb: &EnergyBudget, ctx: &EnergyContext) -> Result<Action> {
    let name = eb.name_any();
    let mut events: Vec<Event> = Vec::new();

    // Shed ModelDeployments, listed afresh: the store may not show an
    // annotation the last evaluation wrote.
    let md_api: Api<ModelDeployment> = match &ctx.watch_namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let mds = md_api.list(&Default::default()).await?.items;
    let unshed = shed_by(&name, &mds);
    for md in mds
        .iter()
        .filter(|md| md.annotations().get(SHED_BY_ANNOTATION) == Some(&name))
    {
        let key = format!("{}/{}", md.namespace().unwrap_or_default(), md.name_any());
        let target = budget::shed_target(min_replicas_of(md), ceiling_of(md));
        let others = ctx.other_wishes(&name, &key, target);
        govern_shed(ctx, md, &name, None, &others).await?;
    }

    // Power limits.
    let remembered: std::collections::HashSet<String> = ctx
        .capped
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&name)
        .map(|m| m.set.keys().cloned().collect())
        .unwrap_or_default();
    let nodes_arc = ctx.nodes.state();
    let all_nodes: BTreeSet<String> = nodes_arc.iter().map(|n| n.name_any()).collect();
    let covered_nodes: BTreeSet<String> = nodes_arc
        .iter()
        .filter(|n| draw::covers(&eb.spec.node_selector, n))
        .map(|n| n.name_any())
        .collect();
    let pods_arc = ctx.pods.state();
    let engine_pods = draw::engine_pods(pods_arc.iter().map(|p| p.as_ref()), &all_nodes);
    let candidates = cap_candidates(
        &engine_pods,
        &remembered,
        &covered_nodes,
        eb.spec.policy.power_cap.enabled,
    );
    let readings = draw::scrape_with_limits(&ctx.http, &candidates).await;
    let mut tokens = Tokens::new();
    let (mut cleared, mut failed) = (Vec::new(), Vec::new());
    for p in candidates
        .iter()
        .filter(|p| needs_clearing(readings.get(&p.key)))
    {
        match send_limit(ctx, &eb.spec.policy.power_cap, p, None, &mut tokens).await {
            Ok(()) => cleared.push(p.key.clone()),
            Err(why) => {
                tracing::warn!(budget = %name, pod = %p.key, %why, "clearing a power limit failed; the budget is deleted anyway");
                events.push(warning(
                    "PowerCapFailed",
                    format!(
                        "{}: clearing the limit: {why}; the budget is deleted anyway",
                        p.key
                    ),
                    "Finalize",
                ));
                failed.push(p.key.clone());
            }
        }
    }
    ctx.capped
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&name);
    ctx.limits
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&name);
    // A deleted budget's gauges would otherwise report its last step for
    // ever (the counters keep their totals).
    let labels = EnergyMetrics::budget(&name);
    ctx.energy.supply_watts.remove(&labels);
    ctx.energy.allowance_watts.remove(&labels);
    ctx.energy.draw_watts.remove(&labels);
    ctx.energy.ladder_step.remove(&labels);

    let list = |v: &[String]| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.join(", ")
        }
    };
    let note = format!(
        "budget deleted: shedding undone on {}; power limit cleared on {}{}",
        list(&unshed),
        list(&cleared),
        if failed.is_empty() {
            String::new()
        } else {
            format!(
                "; not cleared (unreachable or refused): {}",
                failed.join(", ")
            )
        }
    );
    tracing::info!(budget = %name, %note, "energy budget released");
    events.push(Event {
        type_: EventType::Normal,
        reason: "Released".into(),
        note: Some(note.chars().take(1000).collect()),
        action: "Finalize".into(),
        secondary: None,
    });
    publish(ctx, eb, events).await;
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_condition_names_the_gpu_products_missing_from_the_catalog() {
        let (value, reason, message) =
            unknown_products_condition(&["Radeon-Instinct-MI50".to_string()]);
        assert!(value);
        assert_eq!(reason, "ProductsNotInCatalog");
        assert!(message.contains("Radeon-Instinct-MI50"), "{message}");
        assert!(!unknown_products_condition(&[]).0);
    }
    use crate::resources::{PowerCapPolicy, SecretKeyRef};

    fn md(name: &str, shed_by: Option<&str>) -> ModelDeployment {
        let mut md: ModelDeployment = serde_saphyr::from_str(&format!(
            "apiVersion: copyhold.dev/v1alpha1\nkind: ModelDeployment\nmetadata: {{name: {name}, namespace: town}}\nspec:\n  model: {{source: {{hostPath: {{path: /srv/m}}}}}}\n  replicas: 2\n"
        ))
        .expect("valid test manifest");
        if let Some(b) = shed_by {
            md.annotations_mut()
                .insert(SHED_BY_ANNOTATION.into(), b.into());
            md.annotations_mut()
                .insert(SHED_TO_ANNOTATION.into(), "1".into());
        }
        md
    }

    fn pod(key: &str, node: &str) -> EnginePod {
        EnginePod {
            key: key.into(),
            node: node.into(),
            base_url: "http://127.0.0.1:8000".into(),
            model_deployment: None,
            gpus: 1.0,
        }
    }

    #[test]
    fn a_deleted_budget_gives_back_only_the_models_it_shed() {
        let mds = [
            md("b", Some("solar")),
            md("a", Some("solar")),
            md("other", Some("wind")),
            md("free", None),
        ];
        assert_eq!(shed_by("solar", &mds), ["town/a", "town/b"]);
        assert!(shed_by("tidal", &mds).is_empty());
    }

    #[test]
    fn a_deleted_budget_clears_the_pods_it_capped_and_after_a_restart_those_on_its_nodes() {
        let pods = [
            pod("town/a", "gpu-1"),
            pod("town/b", "gpu-2"),
            pod("town/c", "cpu-1"),
        ];
        let covered: BTreeSet<String> = ["gpu-1".to_string(), "gpu-2".to_string()].into();
        let keys = |v: Vec<EnginePod>| v.into_iter().map(|p| p.key).collect::<Vec<_>>();
        // Remembered Pods always, even off the covered nodes (the selector
        // changed); gone Pods never (they are not running).
        let remembered: std::collections::HashSet<String> =
            ["town/c".to_string(), "town/gone".to_string()].into();
        assert_eq!(
            keys(cap_candidates(&pods, &remembered, &covered, true)),
            ["town/a", "town/b", "town/c"]
        );
        // Without the power cap the budget owns only what it set itself.
        assert_eq!(
            keys(cap_candidates(&pods, &remembered, &covered, false)),
            ["town/c"]
        );
        // After a restart: nothing remembered, the covered nodes' Pods.
        assert_eq!(
            keys(cap_candidates(&pods, &Default::default(), &covered, true)),
            ["town/a", "town/b"]
        );
        assert!(cap_candidates(&pods, &Default::default(), &covered, false).is_empty());
        // A Pod saying it has no limit is left alone; one with a limit, one
        // not saying, and one that cannot be read are cleared.
        let reading = |limit| draw::PodReading {
            watts: 100.0,
            limit,
        };
        assert!(!needs_clearing(Some(&reading(Some(None)))));
        assert!(needs_clearing(Some(&reading(Some(Some(150.0))))));
        assert!(needs_clearing(Some(&reading(None))));
        assert!(needs_clearing(None));
    }

    #[test]
    fn the_finalizer_and_the_deletion_trigger_an_evaluation_a_status_write_does_not() {
        let eb: EnergyBudget = serde_saphyr::from_str(
            "apiVersion: copyhold.dev/v1alpha1\nkind: EnergyBudget\nmetadata: {name: solar, generation: 1}\nspec:\n  ceilingWatts: 1000\n  supply: {static: {watts: 500}}\n",
        )
        .expect("valid test manifest");
        let mut status_written = eb.clone();
        status_written.status = Some(EnergyBudgetStatus {
            step: 2,
            ..Default::default()
        });
        status_written.metadata.resource_version = Some("7".into());
        assert_eq!(trigger(&eb), trigger(&status_written));
        let mut finalized = eb.clone();
        finalized.metadata.finalizers = Some(vec![FINALIZER.into()]);
        assert_ne!(trigger(&eb), trigger(&finalized));
        let mut deleted = finalized.clone();
        deleted.metadata.deletion_timestamp = Some(conditions::now());
        assert_ne!(trigger(&finalized), trigger(&deleted));
    }

    #[test]
    fn the_admin_token_is_the_secret_mounted_into_the_pods_unless_the_budget_names_one() {
        let policy = PowerCapPolicy::default();
        let r = admin_token_ref(&policy, Some("copyhold-node-admin"), "town").expect("a ref");
        assert_eq!(
            (r.namespace.as_deref(), r.name.as_str(), r.key.as_str()),
            (Some("town"), "copyhold-node-admin", "token")
        );
        assert_eq!(admin_token_ref(&policy, None, "town"), None);
        // A budget's own Secret: in its namespace when it names one, else
        // in each Pod's.
        let own = PowerCapPolicy {
            admin_token_secret: Some(SecretKeyRef {
                name: "caps".into(),
                namespace: Some("ops".into()),
                key: "t".into(),
            }),
            ..Default::default()
        };
        let r = admin_token_ref(&own, Some("copyhold-node-admin"), "town").expect("a ref");
        assert_eq!(
            (r.namespace.as_deref(), r.name.as_str(), r.key.as_str()),
            (Some("ops"), "caps", "t")
        );
        let per_ns = PowerCapPolicy {
            admin_token_secret: Some(SecretKeyRef {
                name: "caps".into(),
                namespace: None,
                key: "t".into(),
            }),
            ..Default::default()
        };
        let r = admin_token_ref(&per_ns, None, "village").expect("a ref");
        assert_eq!(r.namespace.as_deref(), Some("village"));
    }

    #[test]
    fn small_power_limit_changes_are_not_resent() {
        // 250 W rated: the dead band is 5 W.
        assert!(power_limit_needs_update(None, 150.0, 250.0));
        assert!(!power_limit_needs_update(Some(178.0), 175.0, 250.0));
        assert!(!power_limit_needs_update(Some(178.0), 182.0, 250.0));
        assert!(power_limit_needs_update(Some(178.0), 173.0, 250.0));
        assert!(power_limit_needs_update(Some(178.0), 183.0, 250.0));
        assert!(!power_limit_needs_update(Some(178.0), 178.0, 250.0));
        // Tiny GPUs still get a whole watt of band.
        assert!(!power_limit_needs_update(Some(20.0), 20.4, 10.0));
        assert!(power_limit_needs_update(Some(20.0), 21.0, 10.0));
    }
}
