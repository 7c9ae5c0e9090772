//! Reconcile one ModelDeployment: check it, size the model, place it on the
//! fleet, apply its Deployment and Service, and report in its status.
//!
//! Idempotent: the objects are built deterministically and sent with
//! server-side apply, which the API server does not write when nothing
//! changed; the status is written only when it differs. A spec that cannot
//! be served keeps the previous Deployment where it runs, only scaled (an
//! EnergyBudget's shedding still reaches it).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use tracing::Instrument;

use super::{Context, FIELD_MANAGER, kept};
use crate::conditions;
use crate::error::{Error, Result};
use crate::metrics::{ControllerMetrics, ReasonLabels};
use crate::resources::{ModelDeployment, ModelDeploymentStatus};
use crate::serving::workload::{self, PlacementForWorkload};
use crate::serving::{model_cache, placement};
use crate::validation;

/// Why a ModelDeployment is not (re)placed: a condition reason and a message
/// a person can act on.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub reason: &'static str,
    pub message: String,
}

/// What placement decided, for the status and the Deployment.
#[derive(Debug, Clone)]
pub struct Decision {
    /// Its `replicas` are those placed: all wanted, or the most that fit.
    pub workload: PlacementForWorkload,
    pub classes: Vec<String>,
    /// The class of the first replica's planned node.
    pub gpu_class: Option<String>,
    pub required_memory_bytes: u64,
    pub summary: String,
    /// Why some wanted replicas were not placed (too few free GPUs); the
    /// `Placed` condition then says `InsufficientGPUs` with the counts.
    pub shortage: Option<String>,
}

/// Check, size and place `md` on the fleet the indexes hold now, less what
/// other placements planned and the cache does not show yet (the
/// [`super::ledger`]); where it runs (`current`) it stays while that still
/// fits ([`kept::current`]). When only some of `replicas` fit, the most
/// that fit are placed.
pub async fn decide(
    md: &ModelDeployment,
    replicas: i32,
    current: Option<&placement::Current>,
    pods: &[Arc<Pod>],
    ctx: &Context,
) -> Result<Decision, Refusal> {
    let errors = validation::model_deployment(&md.spec);
    if !errors.is_empty() {
        return Err(Refusal {
            reason: "InvalidSpec",
            message: errors.join("; "),
        });
    }
    let needs = ctx
        .sources
        .model_needs(&ctx.http, &md.spec)
        .await
        .map_err(|e| {
            let hub = md.spec.model.source.hugging_face.as_ref();
            match hub.and_then(|hf| super::download::hub_refusal(hf, &e)) {
                Some((reason, message)) => Refusal { reason, message },
                None => Refusal {
                    reason: e.reason(),
                    message: e.to_string(),
                },
            }
        })?;
    let request = placement::PlacementRequest {
        needs: &needs,
        replicas: u32::try_from(replicas).unwrap_or(0),
        spec: &md.spec.placement,
        gpu_memory_utilization: md.spec.serving.gpu_memory_utilization,
    };
    // The same Pods as the status reports: a Pod bound between two reads
    // of the cache named its node in `Placed` one write before `nodes`.
    let runs_on = bound_nodes(md, pods);
    let caches = super::ledger::Caches {
        nodes: &ctx.indexes.nodes,
        pods: &ctx.indexes.pods,
        models: &ctx.indexes.models,
    };
    // Our own pods' GPUs count as free: re-placing must not be blocked by
    // itself.
    ctx.ledger
        .place(&ObjectRef::from_obj(md), &caches, |fleet| {
            let fitted =
                placement::place_what_fits(&request, fleet, current).map_err(|e| Refusal {
                    reason: e.reason(),
                    message: e.to_string(),
                })?;
            let planned = fitted.placement.replicas.clone();
            Ok((
                decision(md, &request, fitted, fleet, current, &runs_on),
                planned,
            ))
        })
}

/// The [`Decision`] of a placement that found room for `fitted`: the
/// Deployment runs the replicas placed, on the classes they use.
fn decision(
    md: &ModelDeployment,
    request: &placement::PlacementRequest<'_>,
    fitted: placement::Fitted,
    fleet: &[placement::NodeGpus],
    current: Option<&placement::Current>,
    runs_on: &BTreeSet<String>,
) -> Decision {
    let own = workload::selector_labels(&md.name_any());
    let replicas = i32::try_from(fitted.placed()).unwrap_or(i32::MAX);
    let placed = &fitted.placement;
    // An autoscaled model's Pods may go where its maxReplicas would (when
    // they fit): the Pod template, and so the running replicas, stay the
    // same as it scales; the preferences still fill the best GPUs first.
    let widest = md
        .spec
        .autoscaling
        .as_ref()
        .map(|a| a.max_replicas)
        .filter(|&max| max > replicas)
        .and_then(|max| {
            let at_max = placement::PlacementRequest {
                replicas: u32::try_from(max).unwrap_or(0),
                ..*request
            };
            placement::place_keeping(&at_max, fleet, current).ok()
        });
    let affinity = widest.as_ref().unwrap_or(placed).node_affinity(&own);
    let counted = match &fitted.shortage {
        Some(_) => format!("{replicas} of {} replica(s) placed", fitted.wanted),
        None => format!("{replicas} replica(s)"),
    };
    let summary = format!(
        "{counted} of {} GPU(s) each on {}; needs {:.1} GiB per replica: {}{}",
        placed.gpus_per_replica,
        placed.planned_classes().join(" and "),
        placed.required_memory_bytes as f64 / (1u64 << 30) as f64,
        request.needs.breakdown(),
        first_card(placed, fleet, request.gpu_memory_utilization, runs_on),
    );
    let shortage = fitted.shortage.as_ref().map(|e| {
        format!(
            "the other {} wait for GPUs: {e}",
            fitted.wanted.saturating_sub(fitted.placed())
        )
    });
    Decision {
        workload: PlacementForWorkload {
            replicas,
            gpus_per_replica: placed.gpus_per_replica,
            affinity,
        },
        classes: placed.classes.clone(),
        gpu_class: placed.gpu_class().map(str::to_owned),
        required_memory_bytes: placed.required_memory_bytes,
        summary,
        shortage,
    }
}

/// `; of 6.8 GiB usable on node-a's Tesla-P4`: what one replica's GPUs
/// offer at `serving.gpuMemoryUtilization`, on the first node (by name)
/// a Pod of the model is bound to; `; of 6.8 GiB usable on a Tesla-P4`
/// (the first planned replica's card) while none is bound. Not the node
/// the plan expects: the scheduler binds within the classes, not to the
/// planned node, and the plan moves as other models' Pods are bound, so
/// naming it would rewrite the status at every such move.
fn first_card(
    placed: &placement::Placement,
    fleet: &[placement::NodeGpus],
    util: f64,
    runs_on: &BTreeSet<String>,
) -> String {
    let usable = |node: &placement::NodeGpus| {
        (node.memory_bytes_per_gpu as f64 * util).floor() * f64::from(placed.gpus_per_replica)
            / (1u64 << 30) as f64
    };
    if let Some(node) = runs_on
        .iter()
        .find_map(|name| fleet.iter().find(|n| n.name == *name))
    {
        return format!(
            "; of {:.1} GiB usable on {}'s {}",
            usable(node),
            node.name,
            node.product
        );
    }
    let Some(r) = placed.replicas.first() else {
        return String::new();
    };
    let Some(node) = fleet.iter().find(|n| n.name == r.node) else {
        return String::new();
    };
    format!("; of {:.1} GiB usable on a {}", usable(node), r.product)
}

/// The nodes `md`'s Pods (not terminating, not terminated) are bound to.
fn bound_nodes(md: &ModelDeployment, pods: &[Arc<Pod>]) -> BTreeSet<String> {
    let ns = md.namespace();
    let selector = workload::selector_labels(&md.name_any());
    pods.iter()
        .filter(|p| {
            p.metadata.namespace == ns
                && selector.iter().all(|(k, v)| p.labels().get(k) == Some(v))
                && p.metadata.deletion_timestamp.is_none()
                && !placement::terminated(p)
        })
        .filter_map(|p| p.spec.as_ref()?.node_name.clone())
        .collect()
}

fn state_of(status: &ModelDeploymentStatus) -> &'static str {
    match conditions::get(&status.conditions, "Placed") {
        Some(c) if c.status == "False" && c.reason == "InvalidSpec" => "Invalid",
        Some(c) if c.status == "False" => "Unplaceable",
        _ if conditions::is_true(&status.conditions, "Shed") => "Shed",
        _ if conditions::is_true(&status.conditions, "Ready") => "Ready",
        _ if status
            .download
            .as_ref()
            .is_some_and(|d| d.phase != "done" && d.phase != "failed") =>
        {
            "Fetching"
        }
        _ if conditions::get(&status.conditions, "Fetched")
            .is_some_and(|c| c.status == "False") =>
        {
            "FetchFailed"
        }
        _ => "Pending",
    }
}

/// The reconciler.
pub async fn reconcile(md: Arc<ModelDeployment>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let kind = ControllerMetrics::kind("ModelDeployment");
    ctx.metrics.reconciliations.get_or_create(&kind).inc();
    let span = tracing::info_span!(
        "reconcile",
        kind = "ModelDeployment",
        namespace = %md.namespace().unwrap_or_default(),
        name = %md.name_any()
    );
    let result = reconcile_inner(&md, &ctx).instrument(span).await;
    ctx.metrics
        .reconcile_duration
        .get_or_create(&kind)
        .observe(started.elapsed().as_secs_f64());
    if result.is_ok() {
        ctx.succeeded(&md);
    }
    result
}

/// The objects `md` becomes, once placed: the decision, its Deployment
/// (running the replicas an EnergyBudget's shedding leaves) and Service.
type Planned = (Decision, Deployment, Service);

/// The steps of one reconcile: decide (check, size, place, build the
/// objects), act (apply them, or keep what runs and say why not), then
/// report where the replicas run and write the status and Events.
async fn reconcile_inner(md: &ModelDeployment, ctx: &Context) -> Result<Action> {
    let ns = md
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let name = md.name_any();
    let now = conditions::now();
    // The newest status known: the cache may not show this controller's
    // last write yet.
    let newest = ctx.statuses.newest(md);
    let old = newest.clone().unwrap_or_default();
    let mut status = initial_status(md, &old);
    let mut events: Vec<Event> = Vec::new();

    let nodes = ctx.indexes.nodes.state();
    let pods = ctx.indexes.pods.state();
    // The autoscaler (with `spec.autoscaling`) or the spec decides the
    // replicas; an EnergyBudget may shed some through an annotation it
    // owns, and the Deployment runs fewer.
    let scaled = autoscale_step(md, &ns, &name, ctx);
    let (run_replicas, shedding, wanted) = replicas_to_run(md, scaled.as_ref());
    let planned = plan(md, ctx, run_replicas, &pods).await;
    let deployment = match planned {
        Ok(p) => {
            let applied = apply_placed(md, &ns, p, &old, &mut status, &now, &mut events, ctx).await;
            // A plan not applied holds no GPUs.
            if applied.is_err() {
                ctx.ledger.release(&ObjectRef::from_obj(md));
            }
            Some(applied?)
        }
        Err(refusal) => {
            ctx.ledger.release(&ObjectRef::from_obj(md));
            keep_running(
                &ns,
                &name,
                &refusal,
                run_replicas,
                &old,
                &mut status,
                &now,
                &mut events,
                ctx,
            )
            .await?
        }
    };

    report_replicas(
        &mut status,
        deployment.as_ref(),
        &ns,
        &name,
        &pods,
        &nodes,
        &old,
    );
    report_download(md, &ns, &pods, &old, &mut status, &now, &mut events, ctx).await;
    ready_condition(
        &mut status,
        deployment.is_some(),
        md.metadata.generation,
        &now,
        &mut events,
    );
    shed_condition(
        &mut status,
        shedding.as_ref(),
        wanted,
        md.metadata.generation,
        now,
        &mut events,
    );
    if let Some(sc) = &scaled {
        super::autoscaler::report(md, sc, &old, &mut status, &mut events, ctx);
    }
    status.state = Some(state_of(&status).to_string());
    write_status(md, &ns, &name, &status, newest.as_ref(), ctx).await?;
    publish(md, events, ctx).await;
    // Autoscaled objects look again soon too: windows and Leases' liveness
    // run on time.
    let again = next_look(md, &status, ctx);
    Ok(Action::requeue(if scaled.is_some() {
        again.min(super::autoscaler::REQUEUE)
    } else {
        again
    }))
}

/// The `Placed` reason of a model placed in part: some of its replicas
/// wait for GPUs (as the refusal's reason when none fit).
pub const SHORT_OF_GPUS: &str = "InsufficientGPUs";

/// When to look again. Unplaceable objects, and those placed in part, look
/// again soon: GPUs are freed without touching them. While a fetched (huggingFace or http) model is
/// not ready, look every 2 s: the Pods' download progress does not trigger
/// a reconcile by itself.
fn next_look(md: &ModelDeployment, status: &ModelDeploymentStatus, ctx: &Context) -> Duration {
    let placed = conditions::is_true(&status.conditions, "Placed");
    let fetching = status
        .download
        .as_ref()
        .is_some_and(|d| d.phase != "done" && d.phase != "failed")
        || (model_cache::Cached::of(&md.spec.model.source).is_some()
            && placed
            && !conditions::is_true(&status.conditions, "Ready"));
    let in_part =
        conditions::get(&status.conditions, "Placed").is_some_and(|c| c.reason == SHORT_OF_GPUS);
    if fetching {
        Duration::from_secs(2)
    } else if placed && !in_part {
        ctx.resync
    } else {
        Duration::from_secs(30)
    }
}

/// Report the download of a fetched (huggingFace or http) model, read from our Pods' fetch
/// init containers, into `status.download` with its condition and Events.
#[allow(clippy::too_many_arguments)]
async fn report_download(
    md: &ModelDeployment,
    ns: &str,
    pods: &[Arc<Pod>],
    old: &ModelDeploymentStatus,
    status: &mut ModelDeploymentStatus,
    now: &Time,
    events: &mut Vec<Event>,
    ctx: &Context,
) {
    let Some(src) = model_cache::Cached::of(&md.spec.model.source) else {
        return;
    };
    let selector = workload::selector_labels(&md.name_any());
    let own: Vec<Arc<Pod>> = pods
        .iter()
        .filter(|p| {
            p.metadata.namespace.as_deref() == Some(ns)
                && selector.iter().all(|(k, v)| p.labels().get(k) == Some(v))
                && p.metadata.deletion_timestamp.is_none()
        })
        .cloned()
        .collect();
    let seen = super::download::observe(&own, &ctx.http).await;
    download_status(
        status,
        old.download.as_ref(),
        seen,
        &src.describe(),
        md.metadata.generation,
        now.clone(),
        events,
    );
}

/// The autoscaler's decision for `md`, from the replicas its Deployment
/// runs now (the spec's before there is one) and the budget's cap.
fn autoscale_step(
    md: &ModelDeployment,
    ns: &str,
    name: &str,
    ctx: &Context,
) -> Option<super::autoscaler::Scaled> {
    md.spec.autoscaling.as_ref()?;
    let current = ctx
        .indexes
        .deployments
        .get(&ObjectRef::new(name).within(ns))
        .and_then(|d| d.spec.as_ref()?.replicas)
        .unwrap_or(md.spec.replicas);
    let cap = workload::shed_cap(md).map(|s| crate::serving::autoscale::Cap {
        replicas: s.replicas,
        budget: s.budget,
    });
    ctx.autoscaler.decide(md, current, cap, Instant::now())
}

/// Replicas the Deployment runs, the shedding in force, and the replicas
/// wanted before it: the autoscaler's when it decided, else the spec's
/// under the budget's shed-to.
fn replicas_to_run(
    md: &ModelDeployment,
    scaled: Option<&super::autoscaler::Scaled>,
) -> (i32, Option<workload::Shedding>, i32) {
    match scaled {
        Some(s) => {
            let d = &s.decision;
            let shedding = d.capped_by.as_ref().map(|c| workload::Shedding {
                budget: c.budget.clone(),
                replicas: c.replicas,
            });
            (d.desired, shedding, d.recommended)
        }
        None => {
            let (run, shedding) = workload::effective_replicas(md);
            (run, shedding, md.spec.replicas)
        }
    }
}

/// The status this reconcile starts from: what it carries over (conditions,
/// energy, the shedding budget) and what follows from the spec alone.
fn initial_status(md: &ModelDeployment, old: &ModelDeploymentStatus) -> ModelDeploymentStatus {
    let name = md.name_any();
    ModelDeploymentStatus {
        conditions: old.conditions.clone(),
        energy_wh: old.energy_wh,
        shed_by: old.shed_by.clone(),
        observed_generation: md.metadata.generation,
        served_model_name: Some(workload::served_model_name(md)),
        selector: Some(workload::selector_string(&name)),
        endpoint: Some(workload::endpoint(md)),
        ..Default::default()
    }
}

/// Decide: check, size and place `md`, then build its Deployment (with
/// `run_replicas`) and Service. A refusal says why nothing new is applied.
async fn plan(
    md: &ModelDeployment,
    ctx: &Context,
    run_replicas: i32,
    pods: &[Arc<Pod>],
) -> Result<Planned, Refusal> {
    let ns = md.namespace().unwrap_or_default();
    let live = ctx
        .indexes
        .deployments
        .get(&ObjectRef::new(&md.name_any()).within(&ns));
    let current = kept::current(md, live.as_deref());
    let d = decide(md, run_replicas, current.as_ref(), pods, ctx).await?;
    let dep = workload::deployment(md, &d.workload, &ctx.defaults);
    let svc = workload::service(md);
    match (dep, svc) {
        (Ok(dep), Ok(svc)) => Ok((d, dep, svc)),
        (Err(e), _) | (_, Err(e)) => Err(Refusal {
            reason: "UnsupportedSource",
            message: e.to_string(),
        }),
    }
}

/// Act on a placement: apply the Deployment and Service (when they
/// changed), set `Placed`, and say so in an Event when it flipped or the
/// placement changed. Returns the Deployment as it now is.
#[allow(clippy::too_many_arguments)]
async fn apply_placed(
    md: &ModelDeployment,
    ns: &str,
    (d, mut dep, svc): Planned,
    old: &ModelDeploymentStatus,
    status: &mut ModelDeploymentStatus,
    now: &Time,
    events: &mut Vec<Event>,
    ctx: &Context,
) -> Result<Deployment> {
    let name = md.name_any();
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), ns);
    let live_dep = ctx
        .indexes
        .deployments
        .get(&ObjectRef::new(&name).within(ns));
    let live_svc = ctx.indexes.services.get(&ObjectRef::new(&name).within(ns));
    kept::mark(md, &mut dep, d.workload.replicas);
    let applied = apply_if_changed(&deployments, &name, dep, live_dep, ctx).await?;
    apply_if_changed(&services, &name, svc, live_svc, ctx).await?;
    let changed_placement = old.gpus_per_replica != Some(d.workload.gpus_per_replica as i32)
        || old.required_memory_bytes != Some(d.required_memory_bytes as i64);
    let previous = conditions::get(&status.conditions, "Placed")
        .map(|c| (c.reason.clone(), c.message.clone()));
    let (reason, message) = match &d.shortage {
        Some(rest) => (SHORT_OF_GPUS, format!("{}; {rest}", d.summary)),
        None => ("Placed", d.summary.clone()),
    };
    let flipped = conditions::set(
        &mut status.conditions,
        "Placed",
        true,
        reason,
        &message,
        md.metadata.generation,
        now.clone(),
    );
    let changed = previous.as_ref().map(|(r, m)| (r.as_str(), m.as_str()))
        != Some((reason, message.as_str()));
    if d.shortage.is_some() && changed {
        // Some replicas wait for GPUs: a refusal for them, once per change.
        ctx.metrics
            .placement_failures
            .get_or_create(&ReasonLabels {
                reason: SHORT_OF_GPUS.into(),
            })
            .inc();
        events.push(Event {
            type_: EventType::Warning,
            reason: SHORT_OF_GPUS.into(),
            note: Some(message.chars().take(1000).collect()),
            action: "Place".into(),
            secondary: None,
        });
    } else if d.shortage.is_none()
        && (flipped || changed_placement || previous.is_some_and(|(r, _)| r != reason))
    {
        events.push(Event {
            type_: EventType::Normal,
            reason: "Placed".into(),
            note: Some(d.summary.clone()),
            action: "Place".into(),
            secondary: None,
        });
    }
    status.gpus_per_replica = Some(d.workload.gpus_per_replica as i32);
    status.required_memory_bytes = Some(d.required_memory_bytes as i64);
    status.gpu_class = d.gpu_class.clone();
    Ok(applied)
}

/// Act on a refusal: keep the running Deployment (if any) where it is,
/// scaled on its own to `run_replicas` (an EnergyBudget's shedding, the
/// autoscaler's decision) within what its last placement found room for;
/// keep the last placement's figures, and report the refusal. Returns that
/// Deployment as it now is.
#[allow(clippy::too_many_arguments)]
async fn keep_running(
    ns: &str,
    name: &str,
    refusal: &Refusal,
    run_replicas: i32,
    old: &ModelDeploymentStatus,
    status: &mut ModelDeploymentStatus,
    now: &Time,
    events: &mut Vec<Event>,
    ctx: &Context,
) -> Result<Option<Deployment>> {
    let mut existing = ctx
        .indexes
        .deployments
        .get(&ObjectRef::new(name).within(ns))
        .filter(|d| d.metadata.deletion_timestamp.is_none())
        .map(|d| d.as_ref().clone());
    if let Some(replicas) = existing
        .as_ref()
        .and_then(|d| kept::kept_replicas(run_replicas, d))
    {
        let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
        existing = Some(kept::scale(&api, name, replicas).await?);
        ctx.metrics
            .api_writes
            .get_or_create(&ControllerMetrics::kind("Deployment"))
            .inc();
    }
    let kept = existing
        .as_ref()
        .map(|d| d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1));
    refuse(
        status,
        refusal,
        kept,
        status.observed_generation,
        now.clone(),
        events,
        ctx,
    );
    status.gpus_per_replica = old.gpus_per_replica;
    status.required_memory_bytes = old.required_memory_bytes;
    Ok(existing)
}

/// Report: desired and ready replicas from the Deployment, the nodes our
/// Pods run on and their GPU products (the planned class until Pods run).
fn report_replicas(
    status: &mut ModelDeploymentStatus,
    deployment: Option<&Deployment>,
    ns: &str,
    name: &str,
    pods: &[Arc<Pod>],
    nodes: &[Arc<Node>],
    old: &ModelDeploymentStatus,
) {
    let (desired, ready) = deployment
        .map(|d| {
            let desired = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
            let ready = d
                .status
                .as_ref()
                .and_then(|s| s.ready_replicas)
                .unwrap_or(0);
            (desired, ready)
        })
        .unwrap_or((0, 0));
    status.replicas = desired;
    status.ready_replicas = ready;
    let selector = workload::selector_labels(name);
    let mut placed_nodes = BTreeSet::new();
    for p in pods.iter() {
        let mine = p.metadata.namespace.as_deref() == Some(ns)
            && selector.iter().all(|(k, v)| p.labels().get(k) == Some(v))
            && p.metadata.deletion_timestamp.is_none();
        if let (true, Some(node)) = (mine, p.spec.as_ref().and_then(|s| s.node_name.clone())) {
            placed_nodes.insert(node);
        }
    }
    let products: BTreeSet<String> = placed_nodes
        .iter()
        .filter_map(|n| nodes.iter().find(|x| x.name_any() == *n))
        .filter_map(|n| n.labels().get("nvidia.com/gpu.product").cloned())
        .collect();
    if !products.is_empty() {
        status.gpu_class = Some(products.into_iter().collect::<Vec<_>>().join(","));
    } else if status.gpu_class.is_none() {
        status.gpu_class = old.gpu_class.clone();
    }
    status.nodes = placed_nodes.into_iter().collect();
}

/// Whether the replicas serve, as the `Ready` condition's status, reason
/// and message. Pure.
pub fn readiness(deployed: bool, desired: i32, ready: i32) -> (bool, &'static str, String) {
    if !deployed {
        (false, "NoDeployment", "nothing is deployed".to_string())
    } else if desired == 0 {
        (false, "ScaledToZero", "replicas is 0".to_string())
    } else if ready >= desired {
        (
            true,
            "ReplicasReady",
            format!("{ready}/{desired} replicas ready"),
        )
    } else {
        (
            false,
            "ReplicasNotReady",
            format!("{ready}/{desired} replicas ready"),
        )
    }
}

/// Set `Ready` from the reported replicas; a flip is an Event. The first
/// `Ready=False` of a model (its replicas still starting after placement)
/// is not: it is what every new model goes through, and a Warning for it
/// was noise and one more API write per model.
fn ready_condition(
    status: &mut ModelDeploymentStatus,
    deployed: bool,
    generation: Option<i64>,
    now: &Time,
    events: &mut Vec<Event>,
) {
    let (is_ready, reason, message) = readiness(deployed, status.replicas, status.ready_replicas);
    let first = !status.conditions.iter().any(|c| c.type_ == "Ready");
    let changed = conditions::set(
        &mut status.conditions,
        "Ready",
        is_ready,
        reason,
        message.clone(),
        generation,
        now.clone(),
    );
    if changed && (is_ready || !first) {
        events.push(Event {
            type_: if is_ready {
                EventType::Normal
            } else {
                EventType::Warning
            },
            reason: reason.into(),
            note: Some(message),
            action: "Serve".into(),
            secondary: None,
        });
    }
}

/// Write the status when it differs from the newest one known (`newest`:
/// what the object carries, or this controller's last write when the
/// cache does not show it yet).
async fn write_status(
    md: &ModelDeployment,
    ns: &str,
    name: &str,
    status: &ModelDeploymentStatus,
    newest: Option<&ModelDeploymentStatus>,
    ctx: &Context,
) -> Result<()> {
    if Some(status) == newest {
        return Ok(());
    }
    let api: Api<ModelDeployment> = Api::namespaced(ctx.client.clone(), ns);
    let patch = serde_json::json!({
        "apiVersion": "copyhold.dev/v1alpha1",
        "kind": "ModelDeployment",
        "status": status,
    });
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    let written = api
        .patch_status(name, &apply, &Patch::Apply(&patch))
        .await?;
    ctx.statuses
        .wrote(md, status, written.metadata.resource_version);
    ctx.metrics
        .api_writes
        .get_or_create(&ControllerMetrics::kind("ModelDeploymentStatus"))
        .inc();
    Ok(())
}

/// Publish the reconcile's Events on the object.
async fn publish(md: &ModelDeployment, events: Vec<Event>, ctx: &Context) {
    let reference = md.object_ref(&());
    for ev in events {
        if let Err(e) = ctx.recorder.publish(&ev, &reference).await {
            tracing::warn!(error = %e, reason = %ev.reason, "publishing an event failed");
        }
    }
}

/// `status.download`, the `Fetched` condition and the Events at the start
/// and end of a download, from what the Pods say.
fn download_status(
    status: &mut ModelDeploymentStatus,
    old: Option<&crate::resources::DownloadStatus>,
    seen: super::download::Observed,
    what: &str,
    generation: Option<i64>,
    now: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
    events: &mut Vec<Event>,
) {
    let was_running = old.is_some_and(|d| d.phase != "done" && d.phase != "failed");
    let event = |reason: &str, note: String, warning: bool| Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: "Fetch".into(),
        secondary: None,
    };
    if let Some(running) = seen.running {
        if !was_running {
            events.push(event("FetchStarted", format!("fetching {what}"), false));
        }
        status.download = Some(running);
    } else if seen.done {
        let mut d = old.cloned().unwrap_or_default();
        if d.phase != "done" {
            d.phase = "done".into();
            d.bytes_done = d.bytes_total;
            d.eta_seconds = None;
            d.summary = super::download::summary(&d);
            let commit = d.commit.as_deref().unwrap_or("?");
            events.push(event(
                "Fetched",
                format!("{what} (commit {commit}) is in the node's model cache"),
                false,
            ));
        }
        status.download = Some(d);
        conditions::set(
            &mut status.conditions,
            "Fetched",
            true,
            "Fetched",
            format!("{what} is in the model cache"),
            generation,
            now,
        );
        return;
    } else {
        status.download = old.cloned();
    }
    if let Some(message) = seen.failure {
        if let Some(d) = status.download.as_mut() {
            d.phase = "failed".into();
            d.summary = "failed".into();
        }
        if conditions::set(
            &mut status.conditions,
            "Fetched",
            false,
            "FetchFailed",
            &message,
            generation,
            now,
        ) {
            events.push(event("FetchFailed", message, true));
        }
    }
}

/// Report a shedding by an EnergyBudget: `Shed=True` naming the budget and
/// `status.shedBy` while it lasts; `Shed=False` once it ends (only when the
/// object had been shed, so unshed objects carry no extra condition).
fn shed_condition(
    status: &mut ModelDeploymentStatus,
    shedding: Option<&workload::Shedding>,
    wanted: i32,
    generation: Option<i64>,
    now: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
    events: &mut Vec<Event>,
) {
    match shedding {
        Some(s) => {
            let message = format!(
                "EnergyBudget {} shed this ModelDeployment to {} of {wanted} replicas",
                s.budget, s.replicas
            );
            let changed = conditions::get(&status.conditions, "Shed")
                .is_none_or(|c| c.status != "True" || c.message != message);
            conditions::set(
                &mut status.conditions,
                "Shed",
                true,
                "ShedByEnergyBudget",
                &message,
                generation,
                now,
            );
            status.shed_by = Some(s.budget.clone());
            if changed {
                events.push(Event {
                    type_: EventType::Warning,
                    reason: "Shed".into(),
                    note: Some(message),
                    action: "Shed".into(),
                    secondary: None,
                });
            }
        }
        None => {
            status.shed_by = None;
            if conditions::get(&status.conditions, "Shed").is_some()
                && conditions::set(
                    &mut status.conditions,
                    "Shed",
                    false,
                    "NotShed",
                    format!("running all {wanted} replicas"),
                    generation,
                    now,
                )
            {
                events.push(Event {
                    type_: EventType::Normal,
                    reason: "Restored".into(),
                    note: Some(format!("energy budget restored all {wanted} replicas")),
                    action: "Shed".into(),
                    secondary: None,
                });
            }
        }
    }
}

/// Annotation holding a hash of what the controller last applied.
pub const APPLIED_HASH: &str = "copyhold.dev/applied-hash";

/// Server-side apply `desired` unless the live object (from the watch-fed
/// index) already carries it: same hash of the desired object, and every
/// field we set still holds our value. Kubernetes before 1.23 writes a new
/// managedFields time, and so a new resourceVersion, on every apply, even an
/// unchanged one; this keeps a steady object free of writes and requests,
/// while edits of fields we own (drift) are still seen and undone.
async fn apply_if_changed<K>(
    api: &Api<K>,
    name: &str,
    mut desired: K,
    live: Option<Arc<K>>,
    ctx: &Context,
) -> Result<K>
where
    K: Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Resource<DynamicType = ()>,
{
    let hash = content_hash(&desired)?;
    desired
        .annotations_mut()
        .insert(APPLIED_HASH.into(), hash.clone());
    if let Some(live) = live
        && live.annotations().get(APPLIED_HASH) == Some(&hash)
        && live.meta().deletion_timestamp.is_none()
        && is_subset(
            &serde_json::to_value(&desired)?,
            &serde_json::to_value(live.as_ref())?,
        )
    {
        return Ok(live.as_ref().clone());
    }
    let applied = api
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&desired),
        )
        .await?;
    ctx.metrics
        .api_writes
        .get_or_create(&ControllerMetrics::kind(&K::kind(&())))
        .inc();
    Ok(applied)
}

fn is_empty(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Null => true,
        serde_json::Value::Array(a) => a.is_empty(),
        serde_json::Value::Object(o) => o.values().all(is_empty),
        _ => false,
    }
}

/// FNV-1a over the object's JSON: stable across processes and releases.
fn content_hash<K: serde::Serialize>(obj: &K) -> Result<String> {
    let bytes = serde_json::to_vec(obj)?;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    Ok(format!("{h:016x}"))
}

/// Whether every field of `want` holds the same value in `have` (objects
/// may carry more fields in `have`: server defaults; lists must match
/// element by element). Quantities (resource requests and limits, an
/// `emptyDir`'s `sizeLimit`) compare by value: the server stores them in
/// canonical form, `cpu: "0.5"` as `500m`.
pub fn is_subset(want: &serde_json::Value, have: &serde_json::Value) -> bool {
    subset(want, have, false)
}

/// Keys whose values are quantities, or maps of quantities.
const QUANTITY_KEYS: [&str; 3] = ["requests", "limits", "sizeLimit"];

/// [`is_subset`], `quantities` telling whether strings here are quantities.
fn subset(want: &serde_json::Value, have: &serde_json::Value, quantities: bool) -> bool {
    use serde_json::Value;
    match (want, have) {
        (Value::Object(w), Value::Object(h)) => w.iter().all(|(k, wv)| match h.get(k) {
            Some(hv) => subset(wv, hv, quantities || QUANTITY_KEYS.contains(&k.as_str())),
            // The server drops nulls and empty lists and maps.
            None => is_empty(wv),
        }),
        (Value::Array(w), Value::Array(h)) => {
            w.len() == h.len() && w.iter().zip(h).all(|(a, b)| subset(a, b, quantities))
        }
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (Value::String(a), Value::String(b)) if quantities && a != b => same_quantity(a, b),
        (a, b) => a == b,
    }
}

/// Whether two quantity texts stand for the same value (not when either is
/// no quantity at all: then only the same text is the same).
fn same_quantity(a: &str, b: &str) -> bool {
    use crate::resources::quantity::Quantity;
    match (Quantity::parse(a), Quantity::parse(b)) {
        (Ok(a), Ok(b)) => a.same_value(&b),
        _ => false,
    }
}

fn refuse(
    status: &mut ModelDeploymentStatus,
    refusal: &Refusal,
    kept_replicas: Option<i32>,
    generation: Option<i64>,
    now: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
    events: &mut Vec<Event>,
    ctx: &Context,
) {
    let previous = conditions::get(&status.conditions, "Placed")
        .map(|c| (c.reason.clone(), c.message.clone()));
    let kept = kept_replicas
        .map(|r| format!(" (the previous Deployment is kept running at {r} replica(s))"))
        .unwrap_or_default();
    let message = format!("{}{kept}", refusal.message);
    conditions::set(
        &mut status.conditions,
        "Placed",
        false,
        refusal.reason,
        &message,
        generation,
        now,
    );
    if previous != Some((refusal.reason.to_string(), message.clone())) {
        ctx.metrics
            .placement_failures
            .get_or_create(&ReasonLabels {
                reason: refusal.reason.into(),
            })
            .inc();
        events.push(Event {
            type_: EventType::Warning,
            reason: refusal.reason.into(),
            note: Some(message.chars().take(1000).collect()),
            action: "Place".into(),
            secondary: None,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::is_subset;
    use serde_json::json;

    #[test]
    fn server_defaults_do_not_count_as_drift() {
        let want = json!({"spec": {"replicas": 1, "ports": [{"port": 80}]}});
        let have = json!({"spec": {"replicas": 1, "ports": [{"port": 80, "protocol": "TCP"}], "revisionHistoryLimit": 10}});
        assert!(is_subset(&want, &have));
    }

    #[test]
    fn empty_lists_the_server_dropped_are_not_drift() {
        let want = json!({"spec": {"env": [], "args": ["a"], "x": null}});
        assert!(is_subset(&want, &json!({"spec": {"args": ["a"]}})));
    }

    #[test]
    fn a_quantity_the_server_wrote_in_canonical_form_is_not_drift() {
        let want = json!({"resources": {"requests": {"cpu": "0.5", "memory": "1.5Gi"},
                                        "limits": {"memory": "2147483648"}},
                          "volumes": [{"emptyDir": {"sizeLimit": "1e3"}}]});
        let have = json!({"resources": {"requests": {"cpu": "500m", "memory": "1536Mi"},
                                        "limits": {"memory": "2Gi"}},
                          "volumes": [{"emptyDir": {"sizeLimit": "1k"}}]});
        assert!(is_subset(&want, &have));
        let changed = json!({"resources": {"requests": {"cpu": "501m", "memory": "1536Mi"},
                                           "limits": {"memory": "2Gi"}},
                             "volumes": [{"emptyDir": {"sizeLimit": "1k"}}]});
        assert!(!is_subset(&want, &changed));
        // Elsewhere a string is text: "1.0" and "1" differ.
        assert!(!is_subset(
            &json!({"env": [{"value": "1.0"}]}),
            &json!({"env": [{"value": "1"}]})
        ));
    }

    #[test]
    fn an_edited_field_we_own_is_drift() {
        let want = json!({"spec": {"replicas": 1}});
        assert!(!is_subset(&want, &json!({"spec": {"replicas": 5}})));
        assert!(!is_subset(&json!({"a": [1, 2]}), &json!({"a": [1]})));
    }
}

#[cfg(test)]
mod ready_event_tests {
    use super::ready_condition;
    use crate::resources::ModelDeploymentStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use kube::runtime::events::EventType;

    fn now() -> Time {
        Time(jiff::Timestamp::UNIX_EPOCH)
    }

    fn step(
        status: &mut ModelDeploymentStatus,
        desired: i32,
        ready: i32,
    ) -> Vec<(EventType, String)> {
        status.replicas = desired;
        status.ready_replicas = ready;
        let mut events = Vec::new();
        ready_condition(status, true, Some(1), &now(), &mut events);
        events.into_iter().map(|e| (e.type_, e.reason)).collect()
    }

    /// A model that was just placed has replicas starting: that is no
    /// warning (it cost every new model an Event write); becoming ready,
    /// and losing readiness later, are Events.
    #[test]
    fn replicas_still_starting_after_placement_are_no_warning_but_ready_and_lost_readiness_are_events()
     {
        let mut status = ModelDeploymentStatus::default();
        assert_eq!(step(&mut status, 2, 0), vec![]);
        assert_eq!(step(&mut status, 2, 1), vec![]);
        assert_eq!(
            step(&mut status, 2, 2),
            vec![(EventType::Normal, "ReplicasReady".to_string())]
        );
        assert_eq!(
            step(&mut status, 2, 1),
            vec![(EventType::Warning, "ReplicasNotReady".to_string())]
        );
        let cond = status.conditions.iter().find(|c| c.type_ == "Ready");
        assert_eq!(cond.map(|c| c.status.as_str()), Some("False"));
    }
}
