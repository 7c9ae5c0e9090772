//! What the gateway watches: StintQuotas and their Secrets (the key table),
//! ModelDeployments and their Pods (where to send a model's requests), and
//! EnergyBudgets (whether a model's deferrable members must wait).
//!
//! Secrets: only those labelled `copyhold.dev/api-key=true`, only in the
//! namespaces the gateway serves keys for. Upstreams: only Pods whose
//! controller chain (Pod → ReplicaSet → Deployment) ends at the
//! ModelDeployment, matched by uid; ReplicaSets and Deployments are watched
//! as metadata only.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::Notify;

use super::keys::{KeyTable, Owner};
use super::router::Replica;
use crate::conditions;
use crate::resources::energy_budget::EnergyBudget;
use crate::resources::model_deployment::ModelDeployment;
use crate::resources::stint_quota::StintQuota;
use crate::serving::autoscale::Bounds;
use crate::serving::workload::{ENGINE_PORT, MD_LABEL};

/// The label a Secret needs for the gateway to read it as a member's API
/// key (`copyhold.dev/api-key: "true"`); it watches no other Secret.
pub const KEY_LABEL: &str = "copyhold.dev/api-key";

/// Where a request goes.
#[derive(Clone, Debug)]
pub struct Target {
    /// `namespace/name` of the ModelDeployment.
    pub key: String,
    /// The name clients use.
    pub served_name: String,
    pub context_length: i64,
    pub replicas: Vec<Replica>,
    /// `Retry-After` seconds while an EnergyBudget covering the model defers.
    pub deferred: Option<i64>,
    /// How long a request may wait for a ready replica (the model's
    /// `autoscaling.scaleFromZeroTimeout`); `None` without autoscaling:
    /// no ready replica is then a 503 at once.
    pub hold_for: Option<Duration>,
}

/// The watched state.
pub struct Catalog {
    quotas: Store<StintQuota>,
    /// One store per namespace the keys are read in (one for all when the
    /// gateway serves every namespace).
    secrets: Vec<Store<Secret>>,
    models: Store<ModelDeployment>,
    pods: Store<Pod>,
    replicasets: Store<PartialObjectMeta<ReplicaSet>>,
    deployments: Store<PartialObjectMeta<Deployment>>,
    budgets: Store<EnergyBudget>,
    keys: RwLock<Arc<KeyTable>>,
    changed: Arc<Notify>,
}

fn api<K>(client: &Client, ns: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as kube::Resource>::DynamicType: Default,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Run a reflector for `api`, waking `changed` on every event.
fn reflect<K>(api: Api<K>, cfg: watcher::Config, changed: Option<Arc<Notify>>) -> Store<K>
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, cfg)).default_backoff();
    tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(_) => {
                    if let Some(c) = &changed {
                        c.notify_one();
                    }
                }
                Err(e) => tracing::warn!(error = %e, "watch failed; retrying"),
            }
        }
    });
    reader
}

/// The namespaces whose key Secrets are read: those named, else the
/// watched namespace, else every namespace (`None`).
fn key_scopes(namespace: Option<&str>, key_namespaces: &[String]) -> Vec<Option<String>> {
    if !key_namespaces.is_empty() {
        key_namespaces.iter().cloned().map(Some).collect()
    } else {
        vec![namespace.map(String::from)]
    }
}

/// The controller owner reference of `meta`, if it is of `kind`.
fn controller_of<'a>(meta: &'a ObjectMeta, kind: &str) -> Option<&'a OwnerReference> {
    meta.owner_references
        .as_ref()?
        .iter()
        .find(|o| o.controller == Some(true) && o.kind == kind)
}

impl Catalog {
    /// Start the watches (in `namespace`, or everywhere); key Secrets in
    /// `key_namespaces` (when empty, where the rest is watched).
    pub fn start(
        client: &Client,
        namespace: Option<&str>,
        key_namespaces: &[String],
    ) -> Arc<Catalog> {
        let changed = Arc::new(Notify::new());
        let key_label = format!("{KEY_LABEL}=true");
        let secrets = key_scopes(namespace, key_namespaces)
            .into_iter()
            .map(|ns| {
                reflect(
                    api(client, ns.as_deref()),
                    watcher::Config::default().labels(&key_label),
                    Some(changed.clone()),
                )
            })
            .collect();
        let cat = Arc::new(Catalog {
            quotas: reflect(
                api(client, namespace),
                watcher::Config::default(),
                Some(changed.clone()),
            ),
            secrets,
            models: reflect(api(client, namespace), watcher::Config::default(), None),
            pods: reflect(
                api(client, namespace),
                watcher::Config::default().labels(MD_LABEL),
                None,
            ),
            // Metadata only (owner references, uids): `Api` of
            // `PartialObjectMeta` asks the API server for nothing more.
            replicasets: reflect(
                api(client, namespace),
                watcher::Config::default().labels(MD_LABEL),
                None,
            ),
            deployments: reflect(
                api(client, namespace),
                watcher::Config::default().labels(MD_LABEL),
                None,
            ),
            budgets: reflect(Api::all(client.clone()), watcher::Config::default(), None),
            keys: RwLock::new(Arc::new(KeyTable::default())),
            changed,
        });
        let c = cat.clone();
        tokio::spawn(async move {
            loop {
                c.changed.notified().await;
                // Let a burst of events land before rebuilding.
                tokio::time::sleep(Duration::from_millis(50)).await;
                c.rebuild_keys();
            }
        });
        cat
    }

    /// Wait until the first lists are in.
    pub async fn ready(&self, timeout: Duration) -> bool {
        let all = async {
            let _ = self.quotas.wait_until_ready().await;
            for s in &self.secrets {
                let _ = s.wait_until_ready().await;
            }
            let _ = self.models.wait_until_ready().await;
            let _ = self.pods.wait_until_ready().await;
            let _ = self.replicasets.wait_until_ready().await;
            let _ = self.deployments.wait_until_ready().await;
        };
        let ok = tokio::time::timeout(timeout, all).await.is_ok();
        if ok {
            self.rebuild_keys();
        }
        ok
    }

    fn rebuild_keys(&self) {
        let quotas = self.quotas.state();
        let t = KeyTable::build(quotas.iter().map(|q| q.as_ref()), |ns, name| {
            let at = reflector::ObjectRef::new(name).within(ns);
            self.secrets
                .iter()
                .find_map(|s| s.get(&at))
                .and_then(|s| s.data.clone())
                .map(|d| d.into_iter().map(|(k, v)| (k, v.0)).collect())
        });
        if !t.missing.is_empty() {
            tracing::warn!(
                members = ?t.missing,
                "members without a readable API key Secret (missing, without the label {KEY_LABEL}=true, or in a namespace whose keys this gateway does not read): their requests get 401"
            );
        }
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(t);
    }

    pub fn keys(&self) -> Arc<KeyTable> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The owner's quota object, if it still exists.
    pub fn quota(&self, owner: &Owner) -> Option<Arc<StintQuota>> {
        self.quotas
            .get(&reflector::ObjectRef::new(&owner.quota).within(&owner.namespace))
    }

    /// Every StintQuota watched (the register page lists them).
    pub fn quotas(&self) -> Vec<Arc<StintQuota>> {
        self.quotas.state()
    }

    /// A quota by namespace and name.
    pub fn quota_named(&self, namespace: &str, name: &str) -> Option<Arc<StintQuota>> {
        self.quotas
            .get(&reflector::ObjectRef::new(name).within(namespace))
    }

    /// Every EnergyBudget (the register page charts those covering its models).
    pub fn budgets(&self) -> Vec<Arc<EnergyBudget>> {
        self.budgets.state()
    }

    /// `namespace/name` of the ModelDeployments whose `spec.stintQuota`
    /// names this quota.
    pub fn models_of_quota(&self, namespace: &str, quota: &str) -> Vec<String> {
        self.models
            .state()
            .iter()
            .filter(|md| {
                md.namespace().as_deref() == Some(namespace)
                    && md.spec.stint_quota.as_deref() == Some(quota)
            })
            .map(|md| format!("{namespace}/{}", md.name_any()))
            .collect()
    }

    fn served_name(md: &ModelDeployment) -> String {
        md.spec
            .model
            .served_name
            .clone()
            .unwrap_or_else(|| md.name_any())
    }

    /// ModelDeployments the owner's quota opens.
    pub fn models_for(&self, owner: &Owner) -> Vec<Arc<ModelDeployment>> {
        let mut v: Vec<_> = self
            .models
            .state()
            .into_iter()
            .filter(|md| {
                md.namespace().as_deref() == Some(owner.namespace.as_str())
                    && md.spec.stint_quota.as_deref() == Some(owner.quota.as_str())
                    && md.metadata.deletion_timestamp.is_none()
            })
            .collect();
        v.sort_by_key(|m| Self::served_name(m));
        v
    }

    /// The target of `model` for `owner`, if the owner may use it.
    pub fn resolve(&self, owner: &Owner, model: &str) -> Option<Target> {
        let md = self
            .models_for(owner)
            .into_iter()
            .find(|md| Self::served_name(md) == model || md.name_any() == model)?;
        let ns = md.namespace().unwrap_or_default();
        let name = md.name_any();
        let replicas = self.replicas(&ns, &name);
        let key = format!("{ns}/{name}");
        let deferred = self
            .budgets
            .state()
            .iter()
            .filter_map(|b| b.status.as_ref())
            .filter(|s| s.covered.iter().any(|c| c == &key))
            .filter(|s| conditions::is_true(&s.conditions, "Deferring"))
            .map(|s| s.retry_after_seconds.unwrap_or(300).max(1))
            .max();
        let hold_for = md
            .spec
            .autoscaling
            .as_ref()
            .and_then(|a| Bounds::of(a).ok())
            .map(|b| b.from_zero_timeout);
        Some(Target {
            key,
            served_name: Self::served_name(&md),
            context_length: i64::from(md.spec.serving.context_length),
            replicas,
            deferred,
            hold_for,
        })
    }

    /// The controller's reason and message when it cannot place the
    /// ModelDeployment's replicas (`Placed=False`): held requests are then
    /// refused at once.
    pub fn placement_refusal(&self, ns: &str, name: &str) -> Option<(String, String)> {
        let md = self
            .models
            .get(&reflector::ObjectRef::new(name).within(ns))?;
        let c = conditions::get(&md.status.as_ref()?.conditions, "Placed")?;
        (c.status == "False").then(|| (c.reason.clone(), c.message.clone()))
    }

    /// Whether `pod`'s controller is a ReplicaSet whose controller is a
    /// Deployment whose controller is the ModelDeployment with `md_uid`,
    /// each link matched by uid: a Pod that merely carries the label, or
    /// one owned by anything else, is not the model's.
    fn owned_by_model(&self, pod: &Pod, ns: &str, md_uid: &str) -> bool {
        let chain = || -> Option<bool> {
            let rs_ref = controller_of(&pod.metadata, "ReplicaSet")?;
            let rs = self
                .replicasets
                .get(&reflector::ObjectRef::new(&rs_ref.name).within(ns))?;
            if rs.metadata.uid.as_deref() != Some(rs_ref.uid.as_str()) {
                return None;
            }
            let d_ref = controller_of(&rs.metadata, "Deployment")?;
            let d = self
                .deployments
                .get(&reflector::ObjectRef::new(&d_ref.name).within(ns))?;
            if d.metadata.uid.as_deref() != Some(d_ref.uid.as_str()) {
                return None;
            }
            Some(controller_of(&d.metadata, "ModelDeployment")?.uid == md_uid)
        };
        chain().unwrap_or(false)
    }

    /// Ready serving Pods of a ModelDeployment: only those it owns through
    /// its Deployment (see `owned_by_model`).
    pub fn replicas(&self, ns: &str, md: &str) -> Vec<Replica> {
        let Some(md_uid) = self
            .models
            .get(&reflector::ObjectRef::new(md).within(ns))
            .and_then(|m| m.metadata.uid.clone())
        else {
            return Vec::new();
        };
        let mut v: Vec<Replica> = self
            .pods
            .state()
            .iter()
            .filter(|p| p.namespace().as_deref() == Some(ns))
            .filter(|p| p.labels().get(MD_LABEL).map(String::as_str) == Some(md))
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter(|p| self.owned_by_model(p, ns, &md_uid))
            .filter_map(|p| {
                let st = p.status.as_ref()?;
                let ready = st
                    .conditions
                    .as_ref()?
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                let ip = st.pod_ip.as_ref()?;
                if !ready || ip.is_empty() {
                    return None;
                }
                let port = p
                    .spec
                    .as_ref()
                    .and_then(|s| s.containers.first())
                    .and_then(|c| c.ports.as_ref())
                    .and_then(|ps| {
                        ps.iter()
                            .find(|x| x.name.as_deref() == Some("http"))
                            .or(ps.first())
                    })
                    .map(|x| x.container_port)
                    .unwrap_or(ENGINE_PORT);
                let host = if ip.contains(':') {
                    format!("[{ip}]")
                } else {
                    ip.clone()
                };
                Some(Replica {
                    name: p.name_any(),
                    base_url: format!("http://{host}:{port}"),
                })
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}
