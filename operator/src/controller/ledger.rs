//! The reservation ledger: placements are decided one at a time, each on
//! the fleet less what earlier placements planned and the cache does not
//! show yet.
//!
//! Reconciles of different ModelDeployments run at once, and each reads the
//! fleet from the watch-fed caches, where a Deployment just applied has no
//! Pods yet and a Pod just made is not yet bound. Without the ledger two
//! models placed within those seconds both see the same GPUs free, both are
//! `Placed`, and one's Pods stay Pending. With it, the step from reading the
//! fleet to recording what was planned holds one lock (it is pure and
//! short: no API call inside), and every reservation counts as held until
//! the cache shows that model's Pods bound (then the Pods count), the
//! model is placed again (its new plan replaces it), refused, deleted, or
//! the reservation is older than [`Ledger::TTL`] (a plan the cluster did
//! not act on: a quota or an admission webhook refused its Pods).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::reflector::{ObjectRef, Store};

use crate::resources::ModelDeployment;
use crate::serving::placement::{self, NodeGpus, ReplicaPlacement};
use crate::serving::reservation;

/// What one placement planned, and since when.
#[derive(Debug, Clone)]
struct Held {
    replicas: Vec<ReplicaPlacement>,
    since: Instant,
}

/// The plans not yet seen in the cache, by ModelDeployment.
#[derive(Default)]
pub struct Ledger {
    held: Mutex<HashMap<ObjectRef<ModelDeployment>, Held>>,
}

/// What a placement step sees: the caches, and which ModelDeployments still
/// exist (a deleted one's plan is dropped).
pub struct Caches<'a> {
    pub nodes: &'a Store<Node>,
    pub pods: &'a Store<Pod>,
    pub models: &'a Store<ModelDeployment>,
}

impl Ledger {
    /// How long a plan counts while the cluster shows none of it bound.
    /// Binding takes seconds; a minute without it means the Pods will not
    /// come (then they count as what they are).
    pub const TTL: Duration = Duration::from_secs(60);

    /// Decide `key`'s placement with `decide`, on the fleet as it may use it:
    /// the nodes and bound Pods of the caches (its own Pods' GPUs free, as
    /// for any re-placement) less every other model's outstanding plan.
    /// What `decide` plans is held for `key` until the cache shows it; a
    /// refusal drops `key`'s plan.
    pub fn place<T, E>(
        &self,
        key: &ObjectRef<ModelDeployment>,
        caches: &Caches<'_>,
        decide: impl FnOnce(&[NodeGpus]) -> Result<(T, Vec<ReplicaPlacement>), E>,
    ) -> Result<T, E> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        // Read the caches under the lock: a plan and the Pods that confirm
        // it are judged on one snapshot.
        let nodes = caches.nodes.state();
        let pods = caches.pods.state();
        let ns = key.namespace.clone().unwrap_or_default();
        let mut fleet = placement::fleet_from(
            nodes.iter().map(|n| n.as_ref()),
            pods.iter().map(|p| p.as_ref()),
            |p: &Pod| {
                p.metadata.namespace.as_deref() == Some(ns.as_str())
                    && p.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(crate::serving::workload::MD_LABEL))
                        == Some(&key.name)
            },
        );
        let bound = reservation::bound_by_model(pods.iter().map(|p| p.as_ref()));
        held.retain(|k, h| {
            let model = (k.namespace.clone().unwrap_or_default(), k.name.clone());
            caches.models.get(k).is_some()
                && !reservation::outstanding(&h.replicas, bound.get(&model)).is_empty()
        });
        // An expired plan stays recorded (so placing the model again the
        // same way does not renew it) but no longer counts.
        let counted = held
            .iter()
            .filter(|(k, h)| *k != key && h.since.elapsed() < Self::TTL);
        for (k, h) in counted {
            let model = (k.namespace.clone().unwrap_or_default(), k.name.clone());
            reservation::charge(
                &mut fleet,
                reservation::outstanding(&h.replicas, bound.get(&model)),
            );
        }
        match decide(&fleet) {
            Ok((out, replicas)) => {
                let since = match held.get(key) {
                    Some(h) if h.replicas == replicas => h.since,
                    _ => Instant::now(),
                };
                held.insert(key.clone(), Held { replicas, since });
                Ok(out)
            }
            Err(e) => {
                held.remove(key);
                Err(e)
            }
        }
    }

    /// Drop `key`'s plan: it was not applied after all.
    pub fn release(&self, key: &ObjectRef<ModelDeployment>) {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::{reflector, watcher};
    use serde_json::json;

    /// A store holding `objects`, and its writer for later changes.
    fn store<K>(objects: Vec<K>) -> (Store<K>, reflector::store::Writer<K>)
    where
        K: kube::Resource<DynamicType = ()> + Clone + 'static,
    {
        let (store, mut writer) = reflector::store();
        for o in objects {
            writer.apply_watcher_event(&watcher::Event::Apply(o));
        }
        (store, writer)
    }

    fn node(name: &str, gpus: u32) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {placement::PRODUCT_LABEL: "Tesla-V100-SXM2-32GB"}},
            "status": {"allocatable": {placement::GPU_RESOURCE: gpus.to_string()}}
        }))
        .unwrap()
    }

    fn model(name: &str) -> ModelDeployment {
        serde_json::from_value(json!({
            "apiVersion": "copyhold.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": name, "namespace": "n"},
            "spec": {"model": {"source": {"hostPath": {"path": "/m"}}}}
        }))
        .unwrap()
    }

    /// A bound Pod of model `name` holding one GPU of `node`.
    fn bound_pod(name: &str, node: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": format!("{name}-pod"), "namespace": "n",
                         "labels": {crate::serving::workload::MD_LABEL: name}},
            "spec": {"nodeName": node, "containers": [{"name": "c",
                "resources": {"limits": {placement::GPU_RESOURCE: "1"}}}]},
            "status": {"phase": "Pending"}
        }))
        .unwrap()
    }

    /// One GPU on the first node with one free, or a refusal.
    fn one_gpu(fleet: &[NodeGpus]) -> Result<(String, Vec<ReplicaPlacement>), &'static str> {
        let n = fleet.iter().find(|n| n.free_gpus() >= 1).ok_or("full")?;
        let r = ReplicaPlacement {
            node: n.name.clone(),
            product: n.product.clone(),
            gpus: 1,
        };
        Ok((n.name.clone(), vec![r]))
    }

    fn key(name: &str) -> ObjectRef<ModelDeployment> {
        ObjectRef::new(name).within("n")
    }

    #[test]
    fn a_plan_holds_its_gpus_until_its_pods_are_bound_or_its_model_is_deleted() {
        let (nodes, _) = store(vec![node("v", 2)]);
        let (pods, mut pod_writer) = store::<Pod>(vec![]);
        let (models, mut model_writer) = store(vec![model("a"), model("b"), model("c")]);
        let caches = Caches {
            nodes: &nodes,
            pods: &pods,
            models: &models,
        };
        let ledger = Ledger::default();
        // Nothing is bound yet: each plan still counts for the next.
        assert_eq!(ledger.place(&key("a"), &caches, one_gpu), Ok("v".into()));
        assert_eq!(ledger.place(&key("b"), &caches, one_gpu), Ok("v".into()));
        assert_eq!(ledger.place(&key("c"), &caches, one_gpu), Err("full"));
        // Placing a model again does not count its own plan against it.
        assert_eq!(ledger.place(&key("a"), &caches, one_gpu), Ok("v".into()));
        // a's Pod is bound: the Pod counts instead of the plan, once.
        pod_writer.apply_watcher_event(&watcher::Event::Apply(bound_pod("a", "v")));
        assert_eq!(ledger.place(&key("c"), &caches, one_gpu), Err("full"));
        // b is deleted: its plan goes with it.
        model_writer.apply_watcher_event(&watcher::Event::Delete(model("b")));
        assert_eq!(ledger.place(&key("c"), &caches, one_gpu), Ok("v".into()));
        // A refusal drops the refused model's plan.
        assert_eq!(
            ledger.place(&key("c"), &caches, |_| Err("no")),
            Err::<(), _>("no")
        );
        assert_eq!(ledger.place(&key("d"), &caches, one_gpu), Ok("v".into()));
    }
}
