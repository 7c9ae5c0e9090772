//! Placement: which GPU class, how many GPUs per replica, and which nodes a
//! model's replicas go to. Pure logic over a snapshot of the fleet;
//! [`fleet_from`] builds that snapshot from Nodes and Pods.
//!
//! The rule (also in `docs/placement.md`):
//!
//! 1. A replica over `N` GPUs needs `ModelNeeds::bytes_on_gpus(N)` bytes
//!    (the fixed overhead on each GPU). A GPU offers
//!    `floor(memory × gpuMemoryUtilization)` usable bytes, where a
//!    time-sliced card's memory is shared by its slices. A replica may split
//!    its layers across `N` GPUs **of one node** (never across nodes), with
//!    `1 ≤ N ≤ min(maxGpusPerReplica, layers)`.
//! 2. A node is *eligible* for `N` when it has at least `N` allocatable GPUs,
//!    its compute capability is at least the model's minimum (and
//!    `placement.minComputeCapability`), its product is allowed
//!    (`placement.gpuProducts`, empty allows all), it carries every label of
//!    `placement.nodeSelector`, and `N × usable ≥ need`. It has room for
//!    `free / N` replicas. Nodes cordoned, not Ready, or with a taint the
//!    serving Pods do not tolerate are not in the fleet at all.
//! 3. `N` is the smallest count for which eligible nodes have room for all
//!    replicas: a model is split only when no single card that fits is free.
//! 4. Classes (products) eligible for that `N` are ranked by estimated
//!    tokens per joule (bandwidth ÷ TDP from [`crate::serving::gpu_catalog`], unknown
//!    products last), then by least stranded memory (`N × memory − need`),
//!    then by name. Whether a class has free GPUs right now does not change
//!    the list, so the Deployment's affinity does not churn as other
//!    workloads come and go.
//! 5. Replicas are assigned one by one to the node with room that holds the
//!    fewest replicas of this model so far (spread), then of the best class,
//!    then by node name.
//! 6. A model that runs stays where it runs ([`place_keeping`]): while the
//!    classes its Deployment requires hold all its replicas with the same
//!    GPUs per replica, they are the placement, even when a better card is
//!    free; the controller asks for a fresh placement only after a spec
//!    change or when its owner asks (`copyhold.dev/replace`).
//!
//! When nothing can be placed, the error says why in terms a person can act
//! on: no node can hold a replica even with the most GPUs allowed
//! ([`PlacementError::InsufficientVram`]); nodes with enough memory exist but
//! none has the compute capability, product or labels required
//! ([`PlacementError::NoCompatibleGpu`]); or they exist but too few of their
//! GPUs are free together on one node ([`PlacementError::InsufficientGpus`]).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{
    Affinity, Node, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
    PodAffinityTerm, PodAntiAffinity, PreferredSchedulingTerm, Taint, Toleration,
    WeightedPodAffinityTerm,
};
use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::resources::model_deployment::PlacementSpec;
use crate::serving::gpu_catalog;
use crate::serving::sizing::{ModelNeeds, parse_compute_capability};

/// Extended resource name of NVIDIA GPUs (device plugin).
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// GFD label holding the product name.
pub const PRODUCT_LABEL: &str = "nvidia.com/gpu.product";
/// GFD label holding each GPU's memory in MiB.
pub const MEMORY_LABEL: &str = "nvidia.com/gpu.memory";
/// GFD labels holding the compute capability.
pub const CC_MAJOR_LABEL: &str = "nvidia.com/gpu.compute.major";
pub const CC_MINOR_LABEL: &str = "nvidia.com/gpu.compute.minor";
/// Topology key replicas spread over.
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";
/// GFD label: how many allocatable GPUs time-slicing makes of each card.
pub const REPLICAS_LABEL: &str = "nvidia.com/gpu.replicas";
/// Highest weight of a class preference; the best class gets it.
pub const MAX_CLASS_WEIGHT: i32 = 50;
/// Weight of the preference to spread replicas over nodes: above any class
/// preference, as in the placement rule.
pub const SPREAD_WEIGHT: i32 = 100;

const MIB: u64 = 1024 * 1024;

/// The GPUs of one node, as placement sees them.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeGpus {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// `nvidia.com/gpu.product`, or `unknown` when GFD did not label it.
    pub product: String,
    /// Memory of one GPU (from the node's label, else the catalog; 0 if
    /// neither knows: such a node never fits). A time-sliced card's share:
    /// its memory divided by the slices it is shared as, so the Pods on
    /// its slices fit it together.
    pub memory_bytes_per_gpu: u64,
    /// From the node's labels, else the catalog; (0, 0) if neither knows.
    pub compute_capability: (u8, u8),
    pub allocatable_gpus: u32,
    /// GPUs held by pods bound to the node that have not terminated.
    pub allocated_gpus: u32,
}

impl NodeGpus {
    /// GPUs nobody holds.
    pub fn free_gpus(&self) -> u32 {
        self.allocatable_gpus.saturating_sub(self.allocated_gpus)
    }
}

/// What to place.
#[derive(Debug, Clone, Copy)]
pub struct PlacementRequest<'a> {
    pub needs: &'a ModelNeeds,
    pub replicas: u32,
    pub spec: &'a PlacementSpec,
    /// `serving.gpuMemoryUtilization`: the fraction of each GPU the engine
    /// may use.
    pub gpu_memory_utilization: f64,
}

/// Where one replica goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaPlacement {
    pub node: String,
    pub product: String,
    pub gpus: u32,
}

/// The decision: GPUs per replica, the classes allowed (best first), the
/// expected node of each replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub gpus_per_replica: u32,
    /// Products eligible for `gpus_per_replica` (free or not), best first:
    /// the required node affinity.
    pub classes: Vec<String>,
    pub replicas: Vec<ReplicaPlacement>,
    /// `ModelNeeds::bytes_per_replica()`.
    pub required_memory_bytes: u64,
    /// `placement.nodeSelector`, carried into the required node affinity.
    pub node_selector: BTreeMap<String, String>,
}

/// Why a model could not be placed. `reason()` gives the condition reason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlacementError {
    #[error(
        "one replica needs {} of GPU memory but the largest card, {largest_card}, offers {} with {gpus} GPU(s) of one node{}: {} missing. Lower serving.contextLength, serving.maxConcurrentSequences or serving.kvCacheMemory, use a smaller or quantized model, raise placement.maxGpusPerReplica, or add larger GPUs",
        human(*needed_bytes),
        human(*largest_bytes),
        if *limited_by_layers { " (a replica spans at most one GPU per layer)" } else { "" },
        human(*missing_bytes)
    )]
    InsufficientVram {
        largest_card: String,
        largest_bytes: u64,
        needed_bytes: u64,
        missing_bytes: u64,
        /// GPUs of one node the largest offer counts.
        gpus: u32,
        /// The model's layer count, not maxGpusPerReplica, capped the GPUs.
        limited_by_layers: bool,
    },
    #[error(
        "GPUs with enough memory exist but {}. Use engine copyhold (which converts bf16 for older cards), lower placement.minComputeCapability, widen placement.gpuProducts or placement.nodeSelector, or add a newer GPU",
        no_compat_detail(*needed_cc, *best_cc_available, allowed_products, *selector_set)
    )]
    NoCompatibleGpu {
        needed_cc: (u8, u8),
        /// Best compute capability among nodes with enough memory that pass
        /// the product and label filters; `None` if no such node.
        best_cc_available: Option<(u8, u8)>,
        allowed_products: Vec<String>,
        selector_set: bool,
    },
    #[error(
        "{replicas} replica(s) × {gpus_per_replica} GPU(s) on one node need {needed} GPUs but nodes that fit have {free} free, room for {room} replica(s). Free GPUs on those nodes, lower spec.replicas, or allow more GPU products"
    )]
    InsufficientGpus {
        needed: u32,
        free: u32,
        replicas: u32,
        gpus_per_replica: u32,
        room: u32,
    },
    #[error("invalid placement: {0}")]
    Invalid(String),
}

impl PlacementError {
    /// The `Placed=False` condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            PlacementError::InsufficientVram { .. } => "InsufficientVRAM",
            PlacementError::NoCompatibleGpu { .. } => "NoCompatibleGPU",
            PlacementError::InsufficientGpus { .. } => "InsufficientGPUs",
            PlacementError::Invalid(_) => "InvalidPlacement",
        }
    }
}

fn human(bytes: u64) -> String {
    format!(
        "{bytes} bytes ({:.2} GiB)",
        bytes as f64 / (1u64 << 30) as f64
    )
}

fn cc(c: (u8, u8)) -> String {
    format!("{}.{}", c.0, c.1)
}

fn no_compat_detail(
    needed: (u8, u8),
    best: Option<(u8, u8)>,
    products: &[String],
    selector_set: bool,
) -> String {
    match best {
        Some(b) => format!(
            "none has compute capability {} or newer (best: {})",
            cc(needed),
            cc(b)
        ),
        None => {
            let mut what = Vec::new();
            if !products.is_empty() {
                what.push(format!("placement.gpuProducts {products:?}"));
            }
            if selector_set {
                what.push("placement.nodeSelector".to_string());
            }
            format!("none matches {}", what.join(" and "))
        }
    }
}

fn usable(n: &NodeGpus, util: f64) -> u64 {
    (n.memory_bytes_per_gpu as f64 * util).floor() as u64
}

fn fits(n: &NodeGpus, gpus: u32, util: f64, need: u64) -> bool {
    u64::from(gpus).saturating_mul(usable(n, util)) >= need
}

fn product_allowed(n: &NodeGpus, allowed: &[String]) -> bool {
    allowed.is_empty()
        || allowed
            .iter()
            .any(|p| gpu_catalog::same_product(p, &n.product))
}

fn selector_matches(n: &NodeGpus, sel: &BTreeMap<String, String>) -> bool {
    sel.iter().all(|(k, v)| n.labels.get(k) == Some(v))
}

/// Places `req.replicas` replicas on `fleet`, following the rule in the
/// module documentation.
pub fn place(req: &PlacementRequest<'_>, fleet: &[NodeGpus]) -> Result<Placement, PlacementError> {
    let util = req.gpu_memory_utilization;
    if !(util > 0.0 && util <= 1.0) {
        return Err(PlacementError::Invalid(format!(
            "serving.gpuMemoryUtilization must be in (0, 1], got {util}"
        )));
    }
    let max_gpus = u32::try_from(req.spec.max_gpus_per_replica)
        .ok()
        .filter(|&m| m >= 1)
        .ok_or_else(|| {
            PlacementError::Invalid(format!(
                "placement.maxGpusPerReplica must be at least 1, got {}",
                req.spec.max_gpus_per_replica
            ))
        })?;
    let spec_cc = match &req.spec.min_compute_capability {
        Some(s) => Some(parse_compute_capability(s).map_err(|e| {
            PlacementError::Invalid(format!("placement.minComputeCapability: {e}"))
        })?),
        None => None,
    };
    let min_cc = spec_cc.map_or(req.needs.min_compute_capability, |c| {
        c.max(req.needs.min_compute_capability)
    });
    // Split over k GPUs, a replica pays the fixed overhead on each.
    let need = |k: u32| req.needs.bytes_on_gpus(k);
    let max_n = max_gpus.min(req.needs.num_layers);
    let gpu_nodes: Vec<&NodeGpus> = fleet.iter().filter(|n| n.allocatable_gpus > 0).collect();
    let compatible = |n: &NodeGpus| {
        n.compute_capability >= min_cc
            && product_allowed(n, &req.spec.gpu_products)
            && selector_matches(n, &req.spec.node_selector)
    };
    let eligible = |k: u32| -> Vec<&NodeGpus> {
        gpu_nodes
            .iter()
            .copied()
            .filter(|n| n.allocatable_gpus >= k && compatible(n) && fits(n, k, util, need(k)))
            .collect()
    };

    for k in 1..=max_n {
        let nodes = eligible(k);
        let room: u32 = nodes.iter().map(|n| n.free_gpus() / k).sum();
        if !nodes.is_empty() && room >= req.replicas {
            return Ok(assign(req, k, need(k), &nodes));
        }
    }

    // Nothing placed: say why.
    let offer = |n: &NodeGpus| {
        let g = max_n.min(n.allocatable_gpus);
        (u64::from(g).saturating_mul(usable(n, util)), g)
    };
    let big_enough: Vec<&NodeGpus> = gpu_nodes
        .iter()
        .copied()
        .filter(|n| {
            let (bytes, g) = offer(n);
            bytes >= need(g)
        })
        .collect();
    if big_enough.is_empty() {
        let best = gpu_nodes.iter().max_by_key(|n| {
            (
                offer(n).0,
                n.memory_bytes_per_gpu,
                std::cmp::Reverse(&n.name),
            )
        });
        let (largest_bytes, gpus) = best.map_or((0, 0), |n| offer(n));
        let needed_bytes = need(gpus);
        return Err(PlacementError::InsufficientVram {
            largest_card: best
                .map_or_else(|| "none (no node has GPUs)".into(), |n| n.product.clone()),
            largest_bytes,
            needed_bytes,
            missing_bytes: needed_bytes.saturating_sub(largest_bytes),
            gpus,
            limited_by_layers: req.needs.num_layers < max_gpus
                && best.is_some_and(|n| n.allocatable_gpus > req.needs.num_layers),
        });
    }
    if !big_enough.iter().any(|n| compatible(n)) {
        let best_cc_available = big_enough
            .iter()
            .filter(|n| {
                product_allowed(n, &req.spec.gpu_products)
                    && selector_matches(n, &req.spec.node_selector)
            })
            .map(|n| n.compute_capability)
            .max();
        return Err(PlacementError::NoCompatibleGpu {
            needed_cc: min_cc,
            best_cc_available,
            allowed_products: req.spec.gpu_products.clone(),
            selector_set: !req.spec.node_selector.is_empty(),
        });
    }
    // Compatible nodes that fit exist: report the smallest split's shortage.
    let (k, nodes) = (1..=max_n)
        .map(|k| (k, eligible(k)))
        .find(|(_, nodes)| !nodes.is_empty())
        .ok_or_else(|| PlacementError::Invalid("no eligible GPU count found".into()))?;
    Err(PlacementError::InsufficientGpus {
        needed: req.replicas.saturating_mul(k),
        free: nodes.iter().map(|n| n.free_gpus()).sum(),
        replicas: req.replicas,
        gpus_per_replica: k,
        room: nodes.iter().map(|n| n.free_gpus() / k).sum(),
    })
}

/// Ranks the classes eligible for `k` GPUs and assigns replicas to nodes.
fn assign(req: &PlacementRequest<'_>, k: u32, need: u64, nodes: &[&NodeGpus]) -> Placement {
    let with_room: Vec<&NodeGpus> = nodes
        .iter()
        .copied()
        .filter(|n| n.free_gpus() >= k)
        .collect();
    let mut classes: BTreeMap<&str, u64> = BTreeMap::new();
    for n in nodes {
        let stranded = u64::from(k)
            .saturating_mul(n.memory_bytes_per_gpu)
            .saturating_sub(need);
        let e = classes.entry(n.product.as_str()).or_insert(stranded);
        *e = (*e).min(stranded);
    }
    let mut ranked: Vec<(&str, u64)> = classes.into_iter().collect();
    let eff = |p: &str| gpu_catalog::lookup(p).map(gpu_catalog::GpuInfo::bandwidth_per_watt);
    ranked.sort_by(|a, b| {
        // Known efficiency first, higher first; then less stranded; then name.
        match (eff(a.0), eff(b.0)) {
            (Some(x), Some(y)) => y.total_cmp(&x),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => std::cmp::Ordering::Equal,
        }
        .then(a.1.cmp(&b.1))
        .then(a.0.cmp(b.0))
    });
    let classes: Vec<String> = ranked.iter().map(|(p, _)| p.to_string()).collect();
    let rank = |p: &str| classes.iter().position(|c| c == p).unwrap_or(usize::MAX);

    let mut room: BTreeMap<&str, u32> = with_room
        .iter()
        .map(|n| (n.name.as_str(), n.free_gpus() / k))
        .collect();
    let mut used: BTreeMap<&str, u32> = BTreeMap::new();
    let mut replicas = Vec::new();
    for _ in 0..req.replicas {
        let pick = with_room
            .iter()
            .filter(|n| room.get(n.name.as_str()).copied().unwrap_or(0) > 0)
            .min_by_key(|n| {
                (
                    used.get(n.name.as_str()).copied().unwrap_or(0),
                    rank(&n.product),
                    n.name.as_str(),
                )
            });
        let Some(n) = pick else { break };
        if let Some(r) = room.get_mut(n.name.as_str()) {
            *r -= 1;
        }
        *used.entry(n.name.as_str()).or_insert(0) += 1;
        replicas.push(ReplicaPlacement {
            node: n.name.clone(),
            product: n.product.clone(),
            gpus: k,
        });
    }
    Placement {
        gpus_per_replica: k,
        classes,
        replicas,
        required_memory_bytes: need,
        node_selector: req.spec.node_selector.clone(),
    }
}

impl Placement {
    /// The class to report in `status.gpuClass`: the product of the first
    /// replica (the class placement expects to be used), else the best
    /// eligible class.
    pub fn gpu_class(&self) -> Option<&str> {
        self.replicas
            .first()
            .map(|r| r.product.as_str())
            .or(self.classes.first().map(String::as_str))
    }

    /// The `nvidia.com/gpu` limit of each replica's container.
    pub fn gpu_limit(&self) -> Quantity {
        Quantity(self.gpus_per_replica.to_string())
    }

    /// Distinct nodes the replicas are expected on, in order.
    pub fn nodes(&self) -> Vec<String> {
        let mut seen = BTreeSet::new();
        self.replicas
            .iter()
            .filter(|r| seen.insert(r.node.clone()))
            .map(|r| r.node.clone())
            .collect()
    }

    /// The pod affinity that makes the scheduler follow this placement:
    /// required nodeAffinity on the chosen classes (and the node selector),
    /// preferred nodeAffinity by class rank (best gets 50), and a preferred
    /// podAntiAffinity (weight 100) on the hostname for pods carrying
    /// `pod_labels`, so replicas spread.
    /// The classes the planned replicas use, best first; all fitting
    /// classes when no replica is planned (scaled to zero).
    pub fn planned_classes(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for c in &self.classes {
            if self.replicas.iter().any(|r| r.product == *c) {
                out.push(c.clone());
            }
        }
        for r in &self.replicas {
            if !out.contains(&r.product) {
                out.push(r.product.clone());
            }
        }
        if out.is_empty() {
            self.classes.clone()
        } else {
            out
        }
    }

    pub fn node_affinity(&self, pod_labels: &BTreeMap<String, String>) -> Affinity {
        // Required, not merely preferred: the scheduler's own scores (free
        // CPU, balance) would otherwise outweigh the tokens-per-joule order.
        let planned = self.planned_classes();
        let mut required = vec![NodeSelectorRequirement {
            key: PRODUCT_LABEL.into(),
            operator: "In".into(),
            values: Some(planned.clone()),
        }];
        required.extend(
            self.node_selector
                .iter()
                .map(|(k, v)| NodeSelectorRequirement {
                    key: k.clone(),
                    operator: "In".into(),
                    values: Some(vec![v.clone()]),
                }),
        );
        let count = i32::try_from(planned.len()).unwrap_or(i32::MAX).max(1);
        let preferred = planned
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let i = i32::try_from(i).unwrap_or(i32::MAX);
                PreferredSchedulingTerm {
                    weight: (MAX_CLASS_WEIGHT.saturating_mul(count - i) / count).max(1),
                    preference: NodeSelectorTerm {
                        match_expressions: Some(vec![NodeSelectorRequirement {
                            key: PRODUCT_LABEL.into(),
                            operator: "In".into(),
                            values: Some(vec![c.clone()]),
                        }]),
                        match_fields: None,
                    },
                }
            })
            .collect();
        Affinity {
            node_affinity: Some(NodeAffinity {
                required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                    node_selector_terms: vec![NodeSelectorTerm {
                        match_expressions: Some(required),
                        match_fields: None,
                    }],
                }),
                preferred_during_scheduling_ignored_during_execution: Some(preferred),
            }),
            pod_affinity: None,
            pod_anti_affinity: Some(PodAntiAffinity {
                preferred_during_scheduling_ignored_during_execution: Some(vec![
                    WeightedPodAffinityTerm {
                        weight: SPREAD_WEIGHT,
                        pod_affinity_term: PodAffinityTerm {
                            label_selector: Some(LabelSelector {
                                match_labels: Some(pod_labels.clone()),
                                match_expressions: None,
                            }),
                            topology_key: HOSTNAME_LABEL.into(),
                            ..PodAffinityTerm::default()
                        },
                    },
                ]),
                required_during_scheduling_ignored_during_execution: None,
            }),
        }
    }
}

/// GPUs a quantity such as `"2"` counts; anything else counts as none.
fn gpu_count(q: Option<&Quantity>) -> u32 {
    q.and_then(|q| q.0.trim().parse::<u32>().ok()).unwrap_or(0)
}

fn container_gpus(c: &Container) -> u32 {
    let r = c.resources.as_ref();
    let limit = r
        .and_then(|r| r.limits.as_ref())
        .and_then(|l| l.get(GPU_RESOURCE));
    let request = r
        .and_then(|r| r.requests.as_ref())
        .and_then(|l| l.get(GPU_RESOURCE));
    gpu_count(limit.or(request))
}

/// GPUs a pod holds: the sum over its containers, or the largest init
/// container if that is more (the scheduler's effective request).
pub fn pod_gpus(pod: &Pod) -> u32 {
    let Some(spec) = pod.spec.as_ref() else {
        return 0;
    };
    let app: u32 = spec.containers.iter().map(container_gpus).sum();
    let init = spec
        .init_containers
        .iter()
        .flatten()
        .map(container_gpus)
        .max()
        .unwrap_or(0);
    app.max(init)
}

/// Whether the Pod has finished (Succeeded or Failed): it holds nothing.
pub fn terminated(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// False only when the node reports `Ready` other than `True`: the scheduler
/// keeps pods off such nodes (not-ready taint).
fn ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_none_or(|c| c.status == "True")
}

/// Slices each card of a node is shared as: the device plugin's
/// time-slicing makes every card `nvidia.com/gpu.replicas` allocatable
/// GPUs (GFD's label), which share its memory. 1 without the label.
fn slices_per_card(labels: &BTreeMap<String, String>) -> u32 {
    labels
        .get(REPLICAS_LABEL)
        .and_then(|r| r.trim().parse::<u32>().ok())
        .unwrap_or(1)
        .max(1)
}

/// What the engine's Pods tolerate (the Pod template carries exactly
/// these): the `nvidia.com/gpu` NoSchedule taint GPU nodes often have.
pub fn engine_tolerations() -> Vec<Toleration> {
    vec![Toleration {
        key: Some(GPU_RESOURCE.into()),
        operator: Some("Exists".into()),
        effect: Some("NoSchedule".into()),
        ..Default::default()
    }]
}

/// Whether `t` tolerates `taint`, as the scheduler decides it: the same
/// effect (or none named), the same key (or none named with `Exists`),
/// and with `Equal` (the default) the same value.
fn tolerates(t: &Toleration, taint: &Taint) -> bool {
    let effect = t
        .effect
        .as_deref()
        .is_none_or(|e| e.is_empty() || e == taint.effect);
    let exists = t.operator.as_deref() == Some("Exists");
    let key = match t.key.as_deref() {
        None | Some("") => exists,
        Some(k) => k == taint.key,
    };
    let value = exists || t.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or("");
    effect && key && value
}

/// False when the node has a NoSchedule or NoExecute taint that none of
/// `tolerations` tolerates: the scheduler would never bind the Pod there.
/// PreferNoSchedule is only a preference.
fn tolerated(n: &Node, tolerations: &[Toleration]) -> bool {
    n.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .into_iter()
        .flatten()
        .filter(|taint| taint.effect == "NoSchedule" || taint.effect == "NoExecute")
        .all(|taint| tolerations.iter().any(|t| tolerates(t, taint)))
}

/// The fleet as placement sees it: schedulable, ready nodes with GPUs, and the GPUs
/// non-terminated pods bound to them hold. Pods for which `exclude` is true
/// (the replicas of the deployment being re-placed) count as free, so a
/// deployment can keep its own GPUs.
pub fn fleet_from<'a>(
    nodes: impl IntoIterator<Item = &'a Node>,
    pods: impl IntoIterator<Item = &'a Pod>,
    exclude: impl Fn(&Pod) -> bool,
) -> Vec<NodeGpus> {
    let mut allocated: BTreeMap<&str, u32> = BTreeMap::new();
    for p in pods {
        let Some(node) = p.spec.as_ref().and_then(|s| s.node_name.as_deref()) else {
            continue;
        };
        if terminated(p) || exclude(p) {
            continue;
        }
        let e = allocated.entry(node).or_insert(0);
        *e = e.saturating_add(pod_gpus(p));
    }
    let mut out = Vec::new();
    for n in nodes {
        let Some(name) = n.metadata.name.as_deref() else {
            continue;
        };
        if n.spec.as_ref().and_then(|s| s.unschedulable) == Some(true)
            || !ready(n)
            || !tolerated(n, &engine_tolerations())
        {
            continue;
        }
        let allocatable = gpu_count(
            n.status
                .as_ref()
                .and_then(|s| s.allocatable.as_ref())
                .and_then(|a| a.get(GPU_RESOURCE)),
        );
        if allocatable == 0 {
            continue;
        }
        let labels = n.metadata.labels.clone().unwrap_or_default();
        let product = labels
            .get(PRODUCT_LABEL)
            .cloned()
            .unwrap_or_else(|| "unknown".into());
        let known = gpu_catalog::lookup(&product);
        let card_memory = labels
            .get(MEMORY_LABEL)
            .and_then(|m| m.trim().parse::<u64>().ok())
            .map(|mib| mib.saturating_mul(MIB))
            .or(known.map(|g| g.memory_bytes))
            .unwrap_or(0);
        let memory = card_memory / u64::from(slices_per_card(&labels));
        let label_cc = labels
            .get(CC_MAJOR_LABEL)
            .and_then(|m| m.trim().parse::<u8>().ok())
            .zip(
                labels
                    .get(CC_MINOR_LABEL)
                    .and_then(|m| m.trim().parse::<u8>().ok()),
            );
        let compute_capability = label_cc
            .or(known.map(|g| g.compute_capability))
            .unwrap_or((0, 0));
        out.push(NodeGpus {
            name: name.to_string(),
            product,
            memory_bytes_per_gpu: memory,
            compute_capability,
            allocatable_gpus: allocatable,
            allocated_gpus: allocated.get(name).copied().unwrap_or(0),
            labels,
        });
    }
    out
}

/// Where a model's replicas run now: the GPU products its Deployment
/// requires and the GPUs each replica holds. Read from the Deployment's Pod
/// template by [`current_of`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Current {
    pub classes: Vec<String>,
    pub gpus_per_replica: u32,
}

/// Where the Pods of `template` run: the products its required node
/// affinity (or its node selector) allows, and the GPUs one Pod holds.
/// `None` when the template names no product or holds no GPU.
pub fn current_of(template: &k8s_openapi::api::core::v1::PodSpec) -> Option<Current> {
    let required = template
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    let from_affinity: Vec<String> = required
        .iter()
        .flat_map(|r| r.node_selector_terms.iter())
        .flat_map(|t| t.match_expressions.iter().flatten())
        .filter(|e| e.key == PRODUCT_LABEL && e.operator == "In")
        .flat_map(|e| e.values.iter().flatten().cloned())
        .collect();
    let classes = if from_affinity.is_empty() {
        template
            .node_selector
            .as_ref()
            .and_then(|s| s.get(PRODUCT_LABEL))
            .map(|p| vec![p.clone()])
            .unwrap_or_default()
    } else {
        from_affinity
    };
    let pod = Pod {
        spec: Some(template.clone()),
        ..Pod::default()
    };
    let gpus_per_replica = pod_gpus(&pod);
    (!classes.is_empty() && gpus_per_replica > 0).then_some(Current {
        classes,
        gpus_per_replica,
    })
}

/// [`place`], sticky: a model that runs (`current`) stays on its classes
/// with its GPUs per replica while they still hold all its replicas (its
/// own Pods' GPUs count as free), even when a better card is free. Moving
/// a serving model costs a restart and a reload for a gain placement can
/// only estimate, so it moves only when this function is not asked to keep
/// it (a new spec, or its owner asks) or its classes no longer fit; then the
/// rule applies afresh.
pub fn place_keeping(
    req: &PlacementRequest<'_>,
    fleet: &[NodeGpus],
    current: Option<&Current>,
) -> Result<Placement, PlacementError> {
    let fresh = place(req, fleet)?;
    let Some(current) = current else {
        return Ok(fresh);
    };
    Ok(keep(req, fleet, current).unwrap_or(fresh))
}

/// What [`place_what_fits`] found room for.
#[derive(Debug, Clone, PartialEq)]
pub struct Fitted {
    /// The replicas placed: all of them, or the most that fit.
    pub placement: Placement,
    /// The replicas asked for.
    pub wanted: u32,
    /// Why the rest wait, when not all fit: the shortage for all of them.
    pub shortage: Option<PlacementError>,
}

impl Fitted {
    /// Replicas placed.
    pub fn placed(&self) -> u32 {
        u32::try_from(self.placement.replicas.len()).unwrap_or(u32::MAX)
    }
}

/// [`place_keeping`] for all of `req.replicas`, or, when too few GPUs are
/// free for all of them, for the most that fit: a scale-up adds the
/// replicas there is room for instead of none, and the running ones stay
/// where they run as [`place_keeping`] keeps them. `shortage` then says why
/// the rest wait. An error when not one replica fits, or for any reason
/// other than too few free GPUs.
pub fn place_what_fits(
    req: &PlacementRequest<'_>,
    fleet: &[NodeGpus],
    current: Option<&Current>,
) -> Result<Fitted, PlacementError> {
    match place_keeping(req, fleet, current) {
        Ok(placement) => Ok(Fitted {
            placement,
            wanted: req.replicas,
            shortage: None,
        }),
        Err(shortage @ PlacementError::InsufficientGpus { .. }) => (1..req.replicas)
            .rev()
            .find_map(|n| {
                let fewer = PlacementRequest {
                    replicas: n,
                    ..*req
                };
                place_keeping(&fewer, fleet, current).ok()
            })
            .map(|placement| Fitted {
                placement,
                wanted: req.replicas,
                shortage: Some(shortage.clone()),
            })
            .ok_or(shortage),
        Err(e) => Err(e),
    }
}

/// The placement on `current`'s classes alone, when they hold every
/// replica with the same GPUs per replica.
fn keep(req: &PlacementRequest<'_>, fleet: &[NodeGpus], current: &Current) -> Option<Placement> {
    let theirs: Vec<NodeGpus> = fleet
        .iter()
        .filter(|n| current.classes.contains(&n.product))
        .cloned()
        .collect();
    let kept = place(req, &theirs).ok()?;
    (kept.gpus_per_replica == current.gpus_per_replica).then_some(kept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::model_deployment::Dtype;
    use crate::serving::sizing::OVERHEAD_FIXED_BYTES;

    const GIB: u64 = 1 << 30;

    fn node(name: &str, product: &str, mib: u64, cc: (u8, u8), gpus: u32, used: u32) -> NodeGpus {
        NodeGpus {
            name: name.into(),
            labels: BTreeMap::from([(HOSTNAME_LABEL.to_string(), name.to_string())]),
            product: product.into(),
            memory_bytes_per_gpu: mib * MIB,
            compute_capability: cc,
            allocatable_gpus: gpus,
            allocated_gpus: used,
        }
    }

    /// The fleet of `e2e/nodes.yaml`, with GPUs in use per node
    /// (p100, p40, v100, t4). The CPU-only node has no GPUs.
    fn e2e(used: [u32; 4]) -> Vec<NodeGpus> {
        vec![
            node(
                "gpu-p100",
                "Tesla-P100-PCIE-16GB",
                16280,
                (6, 0),
                2,
                used[0],
            ),
            node("gpu-p40", "Tesla-P40", 24451, (6, 1), 1, used[1]),
            node(
                "gpu-v100",
                "Tesla-V100-SXM2-32GB",
                32510,
                (7, 0),
                4,
                used[2],
            ),
            node("gpu-t4", "Tesla-T4", 15360, (7, 5), 1, used[3]),
            node("cpu-only", "unknown", 0, (0, 0), 0, 0),
        ]
    }

    /// Needs whose `bytes_per_replica()` is exactly `total` bytes.
    fn needs(total: u64, cc: (u8, u8), layers: u32) -> ModelNeeds {
        ModelNeeds {
            weight_bytes: 0,
            weights_dtype: Dtype::F16,
            kv_bytes_per_token: 1,
            context_tokens: total - OVERHEAD_FIXED_BYTES,
            kv_cache_bytes: total - OVERHEAD_FIXED_BYTES,
            num_layers: layers,
            min_compute_capability: cc,
            tied_head_bytes: 0,
            weights_note: None,
        }
    }

    #[derive(Debug)]
    enum Expect {
        /// GPUs per replica, nodes of the replicas in order, best class.
        Placed(u32, &'static [&'static str], &'static str),
        Vram(&'static str),
        NoCc(Option<(u8, u8)>),
        NoGpus {
            needed: u32,
            free: u32,
        },
    }

    struct Case {
        name: &'static str,
        fleet: Vec<NodeGpus>,
        need: u64,
        cc: (u8, u8),
        layers: u32,
        replicas: u32,
        spec: PlacementSpec,
        util: f64,
        expect: Expect,
    }

    fn case(name: &'static str, fleet: Vec<NodeGpus>, need: u64, expect: Expect) -> Case {
        Case {
            name,
            fleet,
            need,
            cc: (6, 0),
            layers: 32,
            replicas: 1,
            spec: PlacementSpec::default(),
            util: 0.9,
            expect,
        }
    }

    fn products(p: &[&str]) -> PlacementSpec {
        PlacementSpec {
            gpu_products: p.iter().map(|s| s.to_string()).collect(),
            ..PlacementSpec::default()
        }
    }

    fn cases() -> Vec<Case> {
        use Expect::*;
        let free = [0, 0, 0, 0];
        let mut zone_a = e2e(free);
        zone_a[1].labels.insert("zone".into(), "a".into());
        let mut l = vec![
            case(
                "a 20 GiB model lands on a V100, the most efficient card that fits alone",
                e2e(free),
                20 * GIB,
                Placed(1, &["gpu-v100"], "Tesla-V100-SXM2-32GB"),
            ),
            case(
                "with the V100s taken the 20 GiB model goes to the P40, never the T4",
                e2e([0, 0, 4, 0]),
                20 * GIB,
                Placed(1, &["gpu-p40"], "Tesla-P40"),
            ),
            case(
                "only with V100s and P40 all taken is it split over the two P100s",
                e2e([0, 1, 4, 0]),
                20 * GIB,
                Placed(2, &["gpu-p100"], "Tesla-P100-PCIE-16GB"),
            ),
            case(
                "one P100 taken as well leaves no way: the single cards that fit are all taken",
                e2e([1, 1, 4, 0]),
                20 * GIB,
                NoGpus { needed: 1, free: 0 },
            ),
            case(
                "bf16 compute (8.0) is refused on this fleet naming the best CC, 7.0",
                e2e(free),
                20 * GIB,
                NoCc(Some((7, 0))),
            ),
            case(
                "a small bf16-compute model is refused too; the T4's 7.5 is the best",
                e2e(free),
                4 * GIB,
                NoCc(Some((7, 5))),
            ),
            case(
                "a small model goes to the T4, the best tokens per joule",
                e2e(free),
                4 * GIB,
                Placed(1, &["gpu-t4"], "Tesla-T4"),
            ),
            case(
                "two replicas spread over distinct nodes before sharing one",
                e2e(free),
                20 * GIB,
                Placed(1, &["gpu-v100", "gpu-p40"], "Tesla-V100-SXM2-32GB"),
            ),
            case(
                "three replicas: the third returns to the best class",
                e2e(free),
                20 * GIB,
                Placed(
                    1,
                    &["gpu-v100", "gpu-p40", "gpu-v100"],
                    "Tesla-V100-SXM2-32GB",
                ),
            ),
            case(
                "two replicas share the V100 node when the P40 is taken",
                e2e([0, 1, 0, 0]),
                20 * GIB,
                Placed(1, &["gpu-v100", "gpu-v100"], "Tesla-V100-SXM2-32GB"),
            ),
            case(
                "free GPUs scattered one per node cannot host a two-GPU replica",
                vec![
                    node("a", "Tesla-P100-PCIE-16GB", 16280, (6, 0), 2, 1),
                    node("b", "Tesla-P100-PCIE-16GB", 16280, (6, 0), 2, 1),
                    node("c", "Tesla-P100-PCIE-16GB", 16280, (6, 0), 2, 1),
                ],
                20 * GIB,
                NoGpus { needed: 2, free: 3 },
            ),
            case(
                "a 40 GiB model needs two V100s: P100 pairs are too small",
                e2e(free),
                40 * GIB,
                Placed(2, &["gpu-v100"], "Tesla-V100-SXM2-32GB"),
            ),
            case(
                "nothing fits: a 200 GiB model names the V100 32GB and what is missing",
                e2e(free),
                200 * GIB,
                Vram("Tesla-V100-SXM2-32GB"),
            ),
            case(
                "allowed products keep the model off the V100",
                e2e(free),
                20 * GIB,
                Placed(1, &["gpu-p40"], "Tesla-P40"),
            ),
            case(
                "allowing only the T4 for a 20 GiB model is not compatible",
                e2e(free),
                20 * GIB,
                NoCc(None),
            ),
            case(
                "the node selector keeps the model on labelled nodes",
                zone_a,
                20 * GIB,
                Placed(1, &["gpu-p40"], "Tesla-P40"),
            ),
            case(
                "a fleet with only a CPU node has no card at all",
                vec![node("cpu-only", "unknown", 0, (0, 0), 0, 0)],
                GIB,
                Vram("none (no node has GPUs)"),
            ),
            case(
                "an unknown product is placed from its labels but ranks after known ones",
                vec![
                    node("quadro", "Quadro-RTX-8000", 46080, (7, 5), 1, 0),
                    node("gpu-p40", "Tesla-P40", 24451, (6, 1), 1, 0),
                ],
                20 * GIB,
                Placed(1, &["gpu-p40"], "Tesla-P40"),
            ),
            case(
                "an unknown product hosts what only it can hold",
                vec![
                    node("quadro", "Quadro-RTX-8000", 46080, (7, 5), 1, 0),
                    node("gpu-p40", "Tesla-P40", 24451, (6, 1), 1, 0),
                ],
                30 * GIB,
                Placed(1, &["quadro"], "Quadro-RTX-8000"),
            ),
            case(
                "a two-layer model is never split over three GPUs",
                vec![node("p100x4", "Tesla-P100-PCIE-16GB", 16280, (6, 0), 4, 0)],
                40 * GIB,
                Vram("Tesla-P100-PCIE-16GB"),
            ),
            case(
                "exactly the usable memory of one card fits on one card",
                vec![node("v", "Tesla-V100-SXM2-16GB", 16384, (7, 0), 2, 0)],
                (16384 * MIB) * 9 / 10,
                Placed(1, &["v"], "Tesla-V100-SXM2-16GB"),
            ),
            case(
                "one byte more than one card's usable memory needs two",
                vec![node("v", "Tesla-V100-SXM2-16GB", 16384, (7, 0), 2, 0)],
                (16384 * MIB) * 9 / 10 + 1,
                Placed(2, &["v"], "Tesla-V100-SXM2-16GB"),
            ),
            case(
                "placement.minComputeCapability 7.5 picks the T4 over older cards",
                e2e(free),
                4 * GIB,
                Placed(1, &["gpu-t4"], "Tesla-T4"),
            ),
            case(
                "among equally efficient cards the one stranding less memory wins",
                vec![
                    node("big", "Tesla-V100-SXM2-32GB", 32510, (7, 0), 1, 0),
                    node("small", "Tesla-V100-SXM2-16GB", 16160, (7, 0), 1, 0),
                ],
                10 * GIB,
                Placed(1, &["small"], "Tesla-V100-SXM2-16GB"),
            ),
            case(
                "with one GPU per replica allowed, a full fleet is not split",
                e2e([0, 1, 4, 0]),
                20 * GIB,
                NoGpus { needed: 1, free: 0 },
            ),
            case(
                "zero replicas still choose a class for the affinity",
                e2e([0, 1, 4, 1]),
                20 * GIB,
                Placed(1, &[], "Tesla-V100-SXM2-32GB"),
            ),
            case(
                "a lower gpuMemoryUtilization pushes a 20 GiB model off the P40",
                e2e([0, 0, 4, 0]),
                20 * GIB,
                Placed(2, &["gpu-p100"], "Tesla-P100-PCIE-16GB"),
            ),
        ];
        let by = |l: &mut Vec<Case>, name: &str| -> usize {
            l.iter().position(|c| c.name.starts_with(name)).unwrap()
        };
        let i = by(&mut l, "bf16 compute");
        l[i].cc = (8, 0);
        let i = by(&mut l, "a small bf16");
        l[i].cc = (8, 0);
        let i = by(&mut l, "two replicas spread");
        l[i].replicas = 2;
        let i = by(&mut l, "three replicas");
        l[i].replicas = 3;
        let i = by(&mut l, "two replicas share");
        l[i].replicas = 2;
        let i = by(&mut l, "allowed products keep");
        l[i].spec = products(&["Tesla-P40", "tesla-p100-pcie-16gb"]);
        let i = by(&mut l, "allowing only the T4");
        l[i].spec = products(&["Tesla-T4"]);
        let i = by(&mut l, "the node selector");
        l[i].spec.node_selector = BTreeMap::from([("zone".into(), "a".into())]);
        let i = by(&mut l, "a two-layer model");
        l[i].layers = 2;
        let i = by(&mut l, "placement.minComputeCapability");
        l[i].spec.min_compute_capability = Some("7.5".into());
        let i = by(&mut l, "with one GPU per replica");
        l[i].spec.max_gpus_per_replica = 1;
        let i = by(&mut l, "zero replicas");
        l[i].replicas = 0;
        let i = by(&mut l, "a lower gpuMemoryUtilization");
        l[i].util = 0.8;
        let i = by(&mut l, "exactly the usable");
        l[i].util = 0.9;
        l
    }

    #[test]
    fn placement_follows_the_rule_on_every_table_case() {
        let all = cases();
        assert!(all.len() >= 20);
        for c in all {
            let n = needs(c.need, c.cc, c.layers);
            let req = PlacementRequest {
                needs: &n,
                replicas: c.replicas,
                spec: &c.spec,
                gpu_memory_utilization: c.util,
            };
            let got = place(&req, &c.fleet);
            match (&c.expect, &got) {
                (Expect::Placed(k, nodes, best), Ok(p)) => {
                    assert_eq!(p.gpus_per_replica, *k, "{}: {p:?}", c.name);
                    let on: Vec<&str> = p.replicas.iter().map(|r| r.node.as_str()).collect();
                    assert_eq!(&on[..], *nodes, "{}: {p:?}", c.name);
                    assert_eq!(p.gpu_class(), Some(*best), "{}", c.name);
                    assert!(
                        !p.classes.iter().any(|x| x == "Tesla-T4") || c.need < 15 * GIB,
                        "{}: the T4 never hosts a model it cannot hold: {p:?}",
                        c.name
                    );
                    assert_eq!(p.required_memory_bytes, n.bytes_on_gpus(*k), "{}", c.name);
                    assert!(p.replicas.iter().all(|r| r.gpus == *k));
                }
                (
                    Expect::Vram(card),
                    Err(
                        e @ PlacementError::InsufficientVram {
                            largest_card,
                            largest_bytes,
                            needed_bytes,
                            missing_bytes,
                            gpus,
                            ..
                        },
                    ),
                ) => {
                    assert_eq!(largest_card, card, "{}: {e}", c.name);
                    assert_eq!(*needed_bytes, n.bytes_on_gpus(*gpus), "{}", c.name);
                    assert_eq!(*missing_bytes, needed_bytes - largest_bytes, "{}", c.name);
                    assert_eq!(e.reason(), "InsufficientVRAM");
                    assert!(e.to_string().contains(card), "{}: {e}", c.name);
                }
                (
                    Expect::NoCc(best),
                    Err(
                        e @ PlacementError::NoCompatibleGpu {
                            best_cc_available, ..
                        },
                    ),
                ) => {
                    assert_eq!(best_cc_available, best, "{}: {e}", c.name);
                    assert_eq!(e.reason(), "NoCompatibleGPU");
                }
                (
                    Expect::NoGpus { needed, free },
                    Err(
                        e @ PlacementError::InsufficientGpus {
                            needed: n2,
                            free: f2,
                            ..
                        },
                    ),
                ) => {
                    assert_eq!((n2, f2), (needed, free), "{}: {e}", c.name);
                    assert_eq!(e.reason(), "InsufficientGPUs");
                }
                _ => panic!("{}: expected {:?}, got {got:?}", c.name, c.expect),
            }
        }
    }

    #[test]
    fn classes_do_not_depend_on_what_is_free_so_the_affinity_is_stable() {
        let n = needs(20 * GIB, (6, 0), 32);
        let spec = PlacementSpec::default();
        let req = PlacementRequest {
            needs: &n,
            replicas: 1,
            spec: &spec,
            gpu_memory_utilization: 0.9,
        };
        let free = place(&req, &e2e([0, 0, 0, 0])).unwrap();
        let busy = place(&req, &e2e([0, 1, 3, 0])).unwrap();
        assert_eq!(free.classes, busy.classes);
        assert_eq!(
            free.node_affinity(&BTreeMap::new()),
            busy.node_affinity(&BTreeMap::new())
        );
        // Split over P100s: the V100 (better per watt) stays allowed for two GPUs.
        let split = place(&req, &e2e([0, 1, 4, 0])).unwrap();
        assert_eq!(
            split.classes,
            vec!["Tesla-V100-SXM2-32GB", "Tesla-P100-PCIE-16GB"]
        );
        assert_eq!(split.gpu_class(), Some("Tesla-P100-PCIE-16GB"));
    }

    #[test]
    fn the_twenty_gib_model_lists_v100_then_p40_as_classes() {
        let n = needs(20 * GIB, (6, 0), 32);
        let spec = PlacementSpec::default();
        let req = PlacementRequest {
            needs: &n,
            replicas: 1,
            spec: &spec,
            gpu_memory_utilization: 0.9,
        };
        let p = place(&req, &e2e([0, 0, 0, 0])).unwrap();
        assert_eq!(p.classes, vec!["Tesla-V100-SXM2-32GB", "Tesla-P40"]);
    }

    #[test]
    fn insufficient_vram_says_how_many_bytes_are_missing() {
        let n = needs(200 * GIB, (6, 0), 80);
        let spec = PlacementSpec::default();
        let req = PlacementRequest {
            needs: &n,
            replicas: 1,
            spec: &spec,
            gpu_memory_utilization: 0.9,
        };
        let e = place(&req, &e2e([0, 0, 0, 0])).unwrap_err();
        let offer = 4 * ((32510 * MIB) as f64 * 0.9).floor() as u64;
        // Over four GPUs: the fixed overhead on each.
        let needed = 200 * GIB + 3 * OVERHEAD_FIXED_BYTES;
        assert_eq!(
            e,
            PlacementError::InsufficientVram {
                largest_card: "Tesla-V100-SXM2-32GB".into(),
                largest_bytes: offer,
                needed_bytes: needed,
                missing_bytes: needed - offer,
                gpus: 4,
                limited_by_layers: false,
            }
        );
        let msg = e.to_string();
        assert!(
            msg.contains("Tesla-V100-SXM2-32GB") && msg.contains("missing"),
            "{msg}"
        );
    }

    #[test]
    fn bad_placement_inputs_are_refused_with_a_message() {
        let n = needs(GIB, (6, 0), 32);
        let mut spec = PlacementSpec::default();
        let req = PlacementRequest {
            needs: &n,
            replicas: 1,
            spec: &spec,
            gpu_memory_utilization: 0.0,
        };
        assert!(matches!(
            place(&req, &e2e([0; 4])),
            Err(PlacementError::Invalid(_))
        ));
        spec.min_compute_capability = Some("seven".into());
        let req = PlacementRequest {
            needs: &n,
            replicas: 1,
            spec: &spec,
            gpu_memory_utilization: 0.9,
        };
        assert!(matches!(
            place(&req, &e2e([0; 4])),
            Err(PlacementError::Invalid(_))
        ));
    }

    #[test]
    fn the_affinity_requires_the_classes_prefers_the_best_and_spreads() {
        let n = needs(20 * GIB, (6, 0), 32);
        let spec = PlacementSpec {
            node_selector: BTreeMap::from([("site".into(), "town-hall".into())]),
            ..PlacementSpec::default()
        };
        let mut fleet = e2e([0; 4]);
        for f in &mut fleet {
            f.labels.insert("site".into(), "town-hall".into());
        }
        let req = PlacementRequest {
            needs: &n,
            replicas: 2,
            spec: &spec,
            gpu_memory_utilization: 0.9,
        };
        let p = place(&req, &fleet).unwrap();
        let labels = BTreeMap::from([(
            "app.kubernetes.io/instance".to_string(),
            "llama".to_string(),
        )]);
        let a = p.node_affinity(&labels);
        let na = a.node_affinity.unwrap();
        let req_terms = na
            .required_during_scheduling_ignored_during_execution
            .unwrap()
            .node_selector_terms;
        assert_eq!(req_terms.len(), 1);
        let exprs = req_terms[0].match_expressions.clone().unwrap();
        assert_eq!(exprs[0].key, PRODUCT_LABEL);
        assert_eq!(exprs[0].values.as_deref(), Some(&p.classes[..]));
        assert_eq!(exprs[1].key, "site");
        let pref = na
            .preferred_during_scheduling_ignored_during_execution
            .unwrap();
        let weights: Vec<i32> = pref.iter().map(|t| t.weight).collect();
        assert_eq!(weights, vec![50, 25]);
        let anti = a
            .pod_anti_affinity
            .unwrap()
            .preferred_during_scheduling_ignored_during_execution
            .unwrap();
        assert_eq!(anti[0].weight, 100);
        assert_eq!(anti[0].pod_affinity_term.topology_key, HOSTNAME_LABEL);
        assert_eq!(
            anti[0]
                .pod_affinity_term
                .label_selector
                .as_ref()
                .unwrap()
                .match_labels
                .as_ref(),
            Some(&labels)
        );
        assert_eq!(p.gpu_limit(), Quantity("1".into()));
        assert_eq!(p.nodes(), vec!["gpu-v100", "gpu-p40"]);
    }

    fn e2e_nodes() -> Vec<Node> {
        #[derive(serde::Deserialize)]
        struct List {
            items: Vec<Node>,
        }
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../e2e/nodes.yaml");
        let text = std::fs::read_to_string(path).unwrap();
        serde_saphyr::from_str::<List>(&text).unwrap().items
    }

    fn pod(name: &str, node: Option<&str>, gpus: &str, phase: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"app.kubernetes.io/instance": name}},
            "spec": {
                "nodeName": node,
                "containers": [
                    {"name": "a", "resources": {"limits": {"nvidia.com/gpu": gpus}}},
                    {"name": "sidecar"}
                ],
                "initContainers": [
                    {"name": "i", "resources": {"requests": {"nvidia.com/gpu": "1"}}}
                ]
            },
            "status": {"phase": phase}
        }))
        .unwrap()
    }

    #[test]
    fn the_e2e_fleet_is_read_from_gfd_labels_and_the_cpu_node_is_left_out() {
        let fleet = fleet_from(&e2e_nodes(), &[], |_| false);
        let names: Vec<&str> = fleet.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(
            names,
            vec!["gpu-p100", "gpu-p40", "gpu-v100", "gpu-t4", "gpu-p4"]
        );
        assert_eq!(fleet[0].memory_bytes_per_gpu, 16280 * MIB);
        assert_eq!(fleet[0].allocatable_gpus, 2);
        assert_eq!(fleet[1].compute_capability, (6, 1));
        assert_eq!(fleet[2].product, "Tesla-V100-SXM2-32GB");
        let mut expected = e2e([0; 4]);
        expected.pop();
        for (got, want) in fleet.iter().zip(&expected) {
            assert_eq!(
                (
                    got.memory_bytes_per_gpu,
                    got.compute_capability,
                    got.allocatable_gpus
                ),
                (
                    want.memory_bytes_per_gpu,
                    want.compute_capability,
                    want.allocatable_gpus
                )
            );
        }
    }

    #[test]
    fn running_pods_hold_gpus_and_finished_unbound_or_excluded_ones_do_not() {
        let pods = vec![
            pod("llama", Some("gpu-v100"), "2", "Running"),
            pod("other", Some("gpu-v100"), "1", "Pending"),
            pod("done", Some("gpu-p40"), "1", "Succeeded"),
            pod("failed", Some("gpu-t4"), "1", "Failed"),
            pod("unbound", None, "1", "Pending"),
            pod("mine", Some("gpu-p40"), "1", "Running"),
        ];
        let mine = |p: &Pod| p.metadata.name.as_deref() == Some("mine");
        let fleet = fleet_from(&e2e_nodes(), &pods, mine);
        let used: BTreeMap<&str, u32> = fleet
            .iter()
            .map(|n| (n.name.as_str(), n.allocated_gpus))
            .collect();
        assert_eq!(used["gpu-v100"], 3);
        assert_eq!(
            used["gpu-p40"], 0,
            "finished and excluded pods free their GPU"
        );
        assert_eq!(used["gpu-t4"], 0);
        assert_eq!(used["gpu-p100"], 0);
        assert_eq!(
            pod_gpus(&pod("x", None, "0", "Pending")),
            1,
            "init container's 1 counts"
        );
    }

    #[test]
    fn a_replica_split_over_two_gpus_needs_room_for_the_overhead_on_each() {
        // Two 16 GiB V100s at 0.9 of their memory.
        let fleet = vec![node("v", "Tesla-V100-SXM2-16GB", 16384, (7, 0), 2, 0)];
        let two = 2 * usable(&fleet[0], 0.9);
        let spec = PlacementSpec::default();
        let place_total = |total: u64| {
            let n = needs(total, (6, 0), 32);
            let req = PlacementRequest {
                needs: &n,
                replicas: 1,
                spec: &spec,
                gpu_memory_utilization: 0.9,
            };
            place(&req, &fleet)
        };
        // Counted with one GPU's overhead it would just fit; the second
        // GPU's CUDA context and workspace do not.
        let e = place_total(two).unwrap_err();
        assert!(
            matches!(e, PlacementError::InsufficientVram { needed_bytes, .. } if needed_bytes == two + OVERHEAD_FIXED_BYTES),
            "{e:?}"
        );
        let p = place_total(two - OVERHEAD_FIXED_BYTES).unwrap();
        assert_eq!(p.gpus_per_replica, 2);
        assert_eq!(p.required_memory_bytes, two);
    }

    #[test]
    fn the_slices_of_a_time_sliced_card_share_its_memory() {
        // The T4 (15360 MiB) shared by time-slicing as 2 `nvidia.com/gpu`.
        let mut nodes = e2e_nodes();
        let t4 = nodes
            .iter_mut()
            .find(|n| n.metadata.name.as_deref() == Some("gpu-t4"))
            .unwrap();
        t4.metadata
            .labels
            .get_or_insert_default()
            .insert(REPLICAS_LABEL.into(), "2".into());
        let status = t4.status.get_or_insert_default();
        for q in [status.allocatable.as_mut(), status.capacity.as_mut()]
            .into_iter()
            .flatten()
        {
            q.insert(GPU_RESOURCE.into(), Quantity("2".into()));
        }
        let fleet = fleet_from(&nodes, &[], |_| false);
        let t4 = fleet.iter().find(|n| n.name == "gpu-t4").unwrap();
        assert_eq!(t4.allocatable_gpus, 2);
        assert_eq!(t4.memory_bytes_per_gpu, 15360 * MIB / 2);
        let spec = PlacementSpec {
            gpu_products: vec!["Tesla-T4".into()],
            ..PlacementSpec::default()
        };
        let place_two = |total: u64| {
            let n = needs(total, (6, 0), 32);
            let req = PlacementRequest {
                needs: &n,
                replicas: 2,
                spec: &spec,
                gpu_memory_utilization: 0.9,
            };
            place(&req, &fleet)
        };
        // Two replicas of 6 GiB fit the card together (12 of 13.5 GiB)...
        let p = place_two(6 * GIB).unwrap();
        assert_eq!(p.replicas.len(), 2);
        assert!(p.replicas.iter().all(|r| r.node == "gpu-t4" && r.gpus == 1));
        // ...two of 10 GiB do not, though each fits the card alone.
        assert!(place_two(10 * GIB).is_err());
    }

    #[test]
    fn nodes_with_a_taint_the_engine_does_not_tolerate_are_no_placement_target() {
        let mut nodes = e2e_nodes();
        let taint = |key: &str, effect: &str| k8s_openapi::api::core::v1::Taint {
            key: key.into(),
            value: Some("x".into()),
            effect: effect.into(),
            time_added: None,
        };
        let mut set = |name: &str, t: k8s_openapi::api::core::v1::Taint| {
            let n = nodes
                .iter_mut()
                .find(|n| n.metadata.name.as_deref() == Some(name))
                .unwrap();
            n.spec.get_or_insert_default().taints = Some(vec![t]);
        };
        set("gpu-t4", taint("dedicated", "NoSchedule"));
        set("gpu-p100", taint("dedicated", "NoExecute"));
        // Tolerated by the engine's Pods, or only a preference.
        set("gpu-v100", taint("nvidia.com/gpu", "NoSchedule"));
        set("gpu-p40", taint("dedicated", "PreferNoSchedule"));
        let fleet = fleet_from(&nodes, &[], |_| false);
        let names: Vec<&str> = fleet.iter().map(|n| n.name.as_str()).collect();
        assert!(!names.contains(&"gpu-t4"), "{names:?}");
        assert!(!names.contains(&"gpu-p100"), "{names:?}");
        assert!(names.contains(&"gpu-v100"), "{names:?}");
        assert!(names.contains(&"gpu-p40"), "{names:?}");
        assert!(names.contains(&"gpu-p4"), "{names:?}");
    }

    #[test]
    fn cordoned_and_not_ready_nodes_are_left_out_and_missing_labels_come_from_the_catalog() {
        let mut nodes = e2e_nodes();
        nodes[0].spec = Some(k8s_openapi::api::core::v1::NodeSpec {
            unschedulable: Some(true),
            ..Default::default()
        });
        // GFD labels gone: memory and CC come from the catalog by product.
        if let Some(l) = nodes[3].metadata.labels.as_mut() {
            l.remove(MEMORY_LABEL);
            l.remove(CC_MAJOR_LABEL);
        }
        // The P40 node stops reporting Ready.
        if let Some(c) = nodes[1].status.as_mut().and_then(|s| s.conditions.as_mut()) {
            c[0].status = "False".into();
        }
        let fleet = fleet_from(&nodes, &[], |_| false);
        assert!(fleet.iter().all(|n| n.name != "gpu-p100"));
        assert!(fleet.iter().all(|n| n.name != "gpu-p40"));
        let t4 = fleet.iter().find(|n| n.name == "gpu-t4").unwrap();
        assert_eq!(t4.memory_bytes_per_gpu, 16 << 30);
        assert_eq!(t4.compute_capability, (7, 5));
    }

    #[test]
    fn the_e2e_fleet_places_a_20_gib_model_end_to_end() {
        let pods = vec![pod("busy", Some("gpu-v100"), "4", "Running")];
        let fleet = fleet_from(&e2e_nodes(), &pods, |_| false);
        let n = needs(20 * GIB, (6, 0), 32);
        let spec = PlacementSpec::default();
        let req = PlacementRequest {
            needs: &n,
            replicas: 1,
            spec: &spec,
            gpu_memory_utilization: 0.9,
        };
        let p = place(&req, &fleet).unwrap();
        assert_eq!(p.replicas[0].node, "gpu-p40");
    }

    /// A Pod template as the controller writes it for `p`.
    fn template_of(p: &Placement) -> k8s_openapi::api::core::v1::PodSpec {
        let labels = BTreeMap::from([("app".to_string(), "m".to_string())]);
        k8s_openapi::api::core::v1::PodSpec {
            affinity: Some(p.node_affinity(&labels)),
            containers: vec![Container {
                name: "engine".into(),
                resources: Some(k8s_openapi::api::core::v1::ResourceRequirements {
                    limits: Some(BTreeMap::from([(GPU_RESOURCE.to_string(), p.gpu_limit())])),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn request<'a>(
        n: &'a ModelNeeds,
        spec: &'a PlacementSpec,
        replicas: u32,
    ) -> PlacementRequest<'a> {
        PlacementRequest {
            needs: n,
            replicas,
            spec,
            gpu_memory_utilization: 0.9,
        }
    }

    #[test]
    fn a_model_on_the_p40_stays_there_when_a_v100_frees_up() {
        let n = needs(20 * GIB, (6, 0), 32);
        let spec = PlacementSpec::default();
        let req = request(&n, &spec, 1);
        // Placed while the V100s were taken.
        let then = place(&req, &e2e([0, 0, 4, 0])).unwrap();
        assert_eq!(then.nodes(), ["gpu-p40"]);
        let current = current_of(&template_of(&then)).unwrap();
        // The V100s are free now; its own Pod's GPU counts as free.
        let now = e2e([0, 0, 0, 0]);
        assert_eq!(place(&req, &now).unwrap().nodes(), ["gpu-v100"]);
        let kept = place_keeping(&req, &now, Some(&current)).unwrap();
        assert_eq!(kept.nodes(), ["gpu-p40"]);
        assert_eq!(
            kept.node_affinity(&BTreeMap::new()),
            then.node_affinity(&BTreeMap::new())
        );
        // Without a current placement (a new spec, or asked to), it moves.
        assert_eq!(
            place_keeping(&req, &now, None).unwrap().nodes(),
            ["gpu-v100"]
        );
    }

    #[test]
    fn a_split_model_stays_split_while_its_cards_hold_it() {
        let n = needs(20 * GIB, (6, 0), 32);
        let spec = PlacementSpec::default();
        let req = request(&n, &spec, 1);
        let then = place(&req, &e2e([0, 1, 4, 0])).unwrap();
        assert_eq!(
            (then.gpus_per_replica, then.nodes()),
            (2, vec!["gpu-p100".to_string()])
        );
        let current = current_of(&template_of(&then)).unwrap();
        let kept = place_keeping(&req, &e2e([0, 0, 0, 0]), Some(&current)).unwrap();
        assert_eq!(
            (kept.gpus_per_replica, kept.nodes()),
            (2, vec!["gpu-p100".to_string()])
        );
    }

    #[test]
    fn a_model_whose_cards_no_longer_hold_it_is_placed_afresh() {
        let n = needs(20 * GIB, (6, 0), 32);
        let spec = PlacementSpec::default();
        let current = Current {
            classes: vec!["Tesla-P40".into()],
            gpus_per_replica: 1,
        };
        // Two replicas: the one P40 cannot hold both.
        let two = request(&n, &spec, 2);
        let fleet = e2e([0, 0, 0, 0]);
        let kept = place_keeping(&two, &fleet, Some(&current)).unwrap();
        assert_eq!(kept, place(&two, &fleet).unwrap());
        // The P40 went to someone else.
        let gone =
            place_keeping(&request(&n, &spec, 1), &e2e([0, 1, 0, 0]), Some(&current)).unwrap();
        assert_eq!(gone.nodes(), ["gpu-v100"]);
        // A class too small for the model as it is now (its spec grew).
        let small = Current {
            classes: vec!["Tesla-T4".into()],
            gpus_per_replica: 1,
        };
        let grown =
            place_keeping(&request(&n, &spec, 1), &e2e([0, 0, 0, 0]), Some(&small)).unwrap();
        assert_eq!(grown.nodes(), ["gpu-v100"]);
        // Nothing fits at all: the error of the rule, not a kept placement.
        let none = place_keeping(&request(&n, &spec, 1), &e2e([2, 1, 4, 0]), Some(&current));
        assert!(matches!(none, Err(PlacementError::InsufficientGpus { .. })));
    }

    #[test]
    fn a_scale_up_places_the_replicas_that_fit_on_the_cards_it_runs_on_and_names_the_shortage() {
        let n = needs(20 * GIB, (6, 0), 32);
        let spec = products(&["Tesla-V100-SXM2-32GB"]);
        let current = Current {
            classes: vec!["Tesla-V100-SXM2-32GB".into()],
            gpus_per_replica: 1,
        };
        // Two run (their GPUs count as free); one of the other two is taken.
        let fleet = e2e([0, 0, 1, 0]);
        let fitted = place_what_fits(&request(&n, &spec, 4), &fleet, Some(&current)).unwrap();
        assert_eq!((fitted.placed(), fitted.wanted), (3, 4));
        assert_eq!(fitted.placement.planned_classes(), ["Tesla-V100-SXM2-32GB"]);
        assert_eq!(
            fitted.shortage,
            Some(PlacementError::InsufficientGpus {
                needed: 4,
                free: 3,
                replicas: 4,
                gpus_per_replica: 1,
                room: 3
            })
        );
        // All fit: no shortage.
        let all = place_what_fits(&request(&n, &spec, 3), &fleet, Some(&current)).unwrap();
        assert_eq!((all.placed(), all.shortage), (3, None));
        // Not one fits: the error, as before.
        let none = place_what_fits(&request(&n, &spec, 2), &e2e([0, 0, 4, 0]), None);
        assert!(matches!(none, Err(PlacementError::InsufficientGpus { .. })));
        // Any other refusal is not a shortage.
        let small = place_what_fits(&request(&n, &products(&["Tesla-T4"]), 2), &fleet, None);
        assert!(matches!(small, Err(PlacementError::NoCompatibleGpu { .. })));
    }

    #[test]
    fn where_a_template_runs_is_read_from_its_affinity_or_node_selector() {
        let mut t = k8s_openapi::api::core::v1::PodSpec::default();
        assert_eq!(current_of(&t), None);
        t.node_selector = Some(BTreeMap::from([(
            PRODUCT_LABEL.to_string(),
            "Tesla-T4".to_string(),
        )]));
        // A product but no GPU held: nothing placement made.
        assert_eq!(current_of(&t), None);
        t.containers = template_of(
            &place(
                &request(&needs(4 * GIB, (6, 0), 32), &PlacementSpec::default(), 1),
                &e2e([0, 0, 0, 0]),
            )
            .unwrap(),
        )
        .containers;
        assert_eq!(
            current_of(&t),
            Some(Current {
                classes: vec!["Tesla-T4".into()],
                gpus_per_replica: 1
            })
        );
    }
}
