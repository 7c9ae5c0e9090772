//! What this gateway replica tells the autoscaler: per model, the requests
//! it has in flight and those it holds for a replica, published in one
//! Lease per namespace (`copyhold-gateway-<identity>`, label
//! [`DEMAND_LABEL`], annotation [`DEMAND_ANNOTATION`]). The controller sums
//! the Leases of the live replicas; a Lease is live while its
//! resourceVersion keeps moving, so this replica rewrites it when a count
//! changes and every [`DEMAND_HEARTBEAT`] while any count is not zero.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams};
use tokio::sync::Notify;

use crate::serving::autoscale::{
    DEMAND_ANNOTATION, DEMAND_HEARTBEAT, DEMAND_LABEL, DEMAND_TTL, ModelDemand, PublishedDemand,
};

/// Field manager of the demand Leases.
const FIELD_MANAGER: &str = "copyhold-gateway";

/// Per namespace, per ModelDeployment: this replica's counts.
type Counts = BTreeMap<String, PublishedDemand>;

/// The counts of this replica, and the wake-up of its publisher.
pub struct Demand {
    identity: String,
    counts: Mutex<Counts>,
    changed: Notify,
}

/// One admitted request's place in the counts, given back on drop (so a
/// client that leaves, held or served, is no longer counted).
pub struct Tracked {
    demand: Arc<Demand>,
    namespace: String,
    name: String,
    held: bool,
}

impl Tracked {
    /// Count the request as held (waiting for a ready replica) too.
    pub fn hold(&mut self) {
        if !self.held {
            self.held = true;
            self.demand.add(&self.namespace, &self.name, 0, 1);
        }
    }

    /// The request no longer waits.
    pub fn unhold(&mut self) {
        if self.held {
            self.held = false;
            self.demand.add(&self.namespace, &self.name, 0, -1);
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.unhold();
        self.demand.add(&self.namespace, &self.name, -1, 0);
    }
}

/// A Lease name for `identity`: lowercase letters, digits and dashes.
pub fn lease_name(identity: &str) -> String {
    let clean: String = identity
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let name = format!("copyhold-gateway-{}", clean.trim_matches('-'));
    name.chars().take(253).collect::<String>()
}

impl Demand {
    pub fn new(identity: &str) -> Arc<Demand> {
        Arc::new(Demand {
            identity: identity.to_string(),
            counts: Mutex::new(BTreeMap::new()),
            changed: Notify::new(),
        })
    }

    /// Count a request for the ModelDeployment `key` (`namespace/name`) as
    /// in flight until the returned guard drops.
    pub fn track(self: &Arc<Self>, key: &str) -> Tracked {
        let (namespace, name) = key.split_once('/').unwrap_or(("", key));
        self.add(namespace, name, 1, 0);
        Tracked {
            demand: self.clone(),
            namespace: namespace.to_string(),
            name: name.to_string(),
            held: false,
        }
    }

    fn add(&self, namespace: &str, name: &str, in_flight: i64, held: i64) {
        {
            let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
            let d = c
                .entry(namespace.to_string())
                .or_default()
                .entry(name.to_string())
                .or_default();
            d.in_flight = (d.in_flight + in_flight).max(0);
            d.held = (d.held + held).max(0);
        }
        self.changed.notify_one();
    }

    /// This replica's counts for one model (tests and the held-requests
    /// gauge read it).
    pub fn of(&self, namespace: &str, name: &str) -> ModelDemand {
        let c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.get(namespace)
            .and_then(|m| m.get(name))
            .copied()
            .unwrap_or_default()
    }

    fn snapshot(&self) -> Counts {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Write the Leases until the process ends: at once (after 100 ms for a
    /// burst to land) when a count changes, and every heartbeat while a
    /// namespace has demand. A failed write is retried on the next round.
    pub async fn publish(self: Arc<Self>, client: kube::Client) {
        let mut written: HashMap<String, (PublishedDemand, Instant)> = HashMap::new();
        loop {
            tokio::select! {
                _ = self.changed.notified() => {}
                _ = tokio::time::sleep(DEMAND_HEARTBEAT) => {}
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            for (ns, models) in self.snapshot() {
                let busy = models.values().any(|d| d.in_flight > 0 || d.held > 0);
                let due = match written.get(&ns) {
                    None => busy,
                    Some((last, at)) => {
                        *last != models || (busy && at.elapsed() >= DEMAND_HEARTBEAT)
                    }
                };
                if !due {
                    continue;
                }
                match self.write(&client, &ns, &models).await {
                    Ok(()) => {
                        written.insert(ns, (models, Instant::now()));
                    }
                    Err(e) => {
                        tracing::warn!(namespace = %ns, error = %e, "publishing demand failed")
                    }
                }
            }
        }
    }

    async fn write(
        &self,
        client: &kube::Client,
        ns: &str,
        models: &PublishedDemand,
    ) -> Result<(), DemandError> {
        let name = lease_name(&self.identity);
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ns.to_string()),
                labels: Some(BTreeMap::from([(DEMAND_LABEL.into(), "true".into())])),
                annotations: Some(BTreeMap::from([(
                    DEMAND_ANNOTATION.into(),
                    serde_json::to_string(models)?,
                )])),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                lease_duration_seconds: Some(DEMAND_TTL.as_secs() as i32),
                renew_time: Some(MicroTime(jiff::Timestamp::now())),
                ..Default::default()
            }),
        };
        Api::<Lease>::namespaced(client.clone(), ns)
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&lease),
            )
            .await?;
        Ok(())
    }

    /// Remove this replica's Leases (on shutdown: what it held is no
    /// longer demand).
    pub async fn withdraw(&self, client: &kube::Client) {
        let name = lease_name(&self.identity);
        for ns in self.snapshot().keys() {
            let api = Api::<Lease>::namespaced(client.clone(), ns);
            if let Err(e) = api.delete(&name, &DeleteParams::default()).await {
                tracing::debug!(namespace = %ns, error = %e, "removing the demand Lease");
            }
        }
    }
}

/// Why a demand Lease could not be written.
#[derive(Debug, thiserror::Error)]
pub enum DemandError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("serializing the demand: {0}")]
    Serialize(#[from] serde_json::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_request_is_no_longer_counted_held_or_in_flight() {
        let d = Demand::new("gw-0");
        let mut a = d.track("town/tiny");
        let b = d.track("town/tiny");
        a.hold();
        a.hold();
        assert_eq!(
            d.of("town", "tiny"),
            ModelDemand {
                in_flight: 2,
                held: 1
            }
        );
        drop(a);
        assert_eq!(
            d.of("town", "tiny"),
            ModelDemand {
                in_flight: 1,
                held: 0
            }
        );
        drop(b);
        assert_eq!(d.of("town", "tiny"), ModelDemand::default());
    }

    #[test]
    fn lease_names_are_valid_object_names() {
        assert_eq!(lease_name("Gw_0.x"), "copyhold-gateway-gw-0-x");
    }
}
