//! GPUs a placement planned that the fleet's Pods do not show yet.
//!
//! Between a placement and the scheduler's binding of its Pods lie the
//! Deployment's apply, the ReplicaSet, the Pods' creation and the
//! scheduling: seconds in which the Pods that will hold the GPUs are not in
//! the cache, or are there but not bound. [`placement::fleet_from`] counts
//! bound Pods only, so two models placed in those seconds would both see
//! the same GPUs free. A reservation is what one placement planned (its
//! replicas and their nodes); [`outstanding`] is the part of it the Pods do
//! not show yet, and [`charge`] counts that part as held on the fleet.
//! Pure: the controller's ledger (`controller::ledger`) keeps the
//! reservations and calls these.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::Pod;

use super::placement::{self, NodeGpus, ReplicaPlacement};
use super::workload::MD_LABEL;

/// A model by namespace and name.
pub type ModelKey = (String, String);

/// Per model, its bound Pods that have not terminated, counted per node.
pub fn bound_by_model<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
) -> HashMap<ModelKey, BTreeMap<String, u32>> {
    let mut out: HashMap<ModelKey, BTreeMap<String, u32>> = HashMap::new();
    for p in pods {
        let Some(model) = p.metadata.labels.as_ref().and_then(|l| l.get(MD_LABEL)) else {
            continue;
        };
        let Some(node) = p.spec.as_ref().and_then(|s| s.node_name.as_ref()) else {
            continue;
        };
        if placement::terminated(p) {
            continue;
        }
        let key = (
            p.metadata.namespace.clone().unwrap_or_default(),
            model.clone(),
        );
        *out.entry(key).or_default().entry(node.clone()).or_insert(0) += 1;
    }
    out
}

/// The planned replicas that no bound Pod of the model stands for yet.
/// A bound Pod stands for a planned replica on its own node first; Pods
/// the scheduler bound elsewhere (it follows the classes, not the nodes)
/// still count against the total, so what is outstanding is never more
/// than the replicas planned less the Pods bound.
pub fn outstanding<'a>(
    planned: &'a [ReplicaPlacement],
    bound: Option<&BTreeMap<String, u32>>,
) -> Vec<&'a ReplicaPlacement> {
    let mut left: BTreeMap<&str, u32> = bound
        .into_iter()
        .flatten()
        .map(|(n, c)| (n.as_str(), *c))
        .collect();
    let total: u32 = left.values().sum();
    let unmatched: Vec<&ReplicaPlacement> = planned
        .iter()
        .filter(|r| match left.get_mut(r.node.as_str()) {
            Some(c) if *c > 0 => {
                *c -= 1;
                false
            }
            _ => true,
        })
        .collect();
    let still = (planned.len() as u32).saturating_sub(total) as usize;
    unmatched.into_iter().take(still).collect()
}

/// Count `replicas` as held on their nodes of `fleet`.
pub fn charge<'a>(
    fleet: &mut [NodeGpus],
    replicas: impl IntoIterator<Item = &'a ReplicaPlacement>,
) {
    for r in replicas {
        if let Some(n) = fleet.iter_mut().find(|n| n.name == r.node) {
            n.allocated_gpus = n.allocated_gpus.saturating_add(r.gpus);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(node: &str) -> ReplicaPlacement {
        ReplicaPlacement {
            node: node.into(),
            product: "Tesla-V100-SXM2-32GB".into(),
            gpus: 1,
        }
    }

    fn pod(ns: &str, model: &str, node: Option<&str>, phase: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": ns, "labels": {MD_LABEL: model}},
            "spec": {"nodeName": node, "containers": []},
            "status": {"phase": phase}
        }))
        .unwrap()
    }

    #[test]
    fn planned_replicas_are_outstanding_until_their_pods_are_bound() {
        let planned = [replica("a"), replica("a"), replica("b")];
        assert_eq!(outstanding(&planned, None).len(), 3);
        let pods = [
            pod("n", "m", Some("a"), "Pending"),
            pod("n", "m", None, "Pending"),
            pod("n", "other", Some("b"), "Running"),
            pod("x", "m", Some("b"), "Running"),
            pod("n", "m", Some("b"), "Failed"),
        ];
        let bound = bound_by_model(&pods);
        let left = outstanding(&planned, bound.get(&("n".into(), "m".into())));
        assert_eq!(
            left.iter().map(|r| r.node.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
    }

    #[test]
    fn pods_bound_elsewhere_than_planned_still_count_against_the_total() {
        let planned = [replica("a"), replica("b")];
        let bound = BTreeMap::from([("c".to_string(), 1)]);
        let left = outstanding(&planned, Some(&bound));
        assert_eq!(left.len(), 1);
        let bound = BTreeMap::from([("c".to_string(), 2)]);
        assert!(outstanding(&planned, Some(&bound)).is_empty());
    }

    #[test]
    fn charging_counts_the_gpus_as_held_on_their_nodes() {
        let mut fleet = vec![NodeGpus {
            name: "a".into(),
            labels: BTreeMap::new(),
            product: "Tesla-V100-SXM2-32GB".into(),
            memory_bytes_per_gpu: 32 << 30,
            compute_capability: (7, 0),
            allocatable_gpus: 4,
            allocated_gpus: 1,
        }];
        let planned = [replica("a"), replica("a"), replica("gone")];
        charge(&mut fleet, &planned);
        assert_eq!(fleet[0].free_gpus(), 1);
    }
}
