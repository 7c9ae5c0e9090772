//! Each gateway replica's slices of one StintQuota, in a Lease of its own
//! (in the quota's namespace, owned by the quota so that it goes with it):
//! name `copyhold-slices-<hash of quota and replica>`, label
//! [`SLICES_LABEL`] = a hash of the quota's name (names may be longer than a
//! label value), annotation [`SLICES_ANNOTATION`] = the replica's
//! [`ReplicaSlices`] as JSON. Only its replica writes it (replace with the
//! resourceVersion it wrote last); a reader that found the replica dead
//! deletes it, with that resourceVersion as a precondition.

use std::collections::BTreeMap;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference};
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams, Preconditions};
use sha2::{Digest, Sha256};

use crate::commons::ledger_leases::{HeldLease, ReplicaSlices};
use crate::resources::stint_quota::{StintQuota, StintQuotaStatus};

/// Label naming the quota (a hash of its name) on its slice Leases.
pub const SLICES_LABEL: &str = "copyhold.dev/slices-of";
/// Annotation holding a replica's slices and beats.
pub const SLICES_ANNOTATION: &str = "copyhold.dev/slices";
/// Annotation naming the quota, for people.
const QUOTA_ANNOTATION: &str = "copyhold.dev/stint-quota";

/// Why a slice Lease could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SliceLeaseError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("slice Lease {0}: {1}")]
    Annotation(String, serde_json::Error),
    #[error("slice Lease {0} stayed contended")]
    Contended(String),
}

fn hash(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    h.finalize()[..10]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The label value of `quota`'s slice Leases.
pub fn quota_label(quota: &str) -> String {
    hash(&[quota])
}

/// The name of `replica`'s slice Lease for `quota`.
pub fn lease_name(quota: &str, replica: &str) -> String {
    format!("copyhold-slices-{}", hash(&[quota, replica]))
}

/// Every replica's slice Lease of `quota`, read from the API server.
pub async fn list(api: &Api<Lease>, quota: &str) -> Result<Vec<HeldLease>, SliceLeaseError> {
    let lp = ListParams::default().labels(&format!("{SLICES_LABEL}={}", quota_label(quota)));
    let mut out = Vec::new();
    for l in api.list(&lp).await? {
        let name = l.metadata.name.clone().unwrap_or_default();
        let Some(json) = l
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(SLICES_ANNOTATION))
        else {
            continue;
        };
        let held: ReplicaSlices =
            serde_json::from_str(json).map_err(|e| SliceLeaseError::Annotation(name.clone(), e))?;
        out.push(HeldLease {
            resource_version: l.metadata.resource_version.clone().unwrap_or_default(),
            renewed_at: l
                .spec
                .as_ref()
                .and_then(|s| s.renew_time.as_ref())
                .map(|t| t.0)
                .unwrap_or(jiff::Timestamp::UNIX_EPOCH),
            name,
            held,
        });
    }
    Ok(out)
}

/// What writing one's own Lease found.
pub enum Wrote {
    /// Written; its new resourceVersion.
    Ok(String),
    /// The Lease this replica wrote last is gone or was replaced: a reader
    /// found this replica dead and charged its slices.
    Reclaimed,
}

/// Write this replica's Lease: create it when `last` is None, else replace
/// the version written last. Only this replica writes it, so a conflict
/// means an earlier write of its own took effect unseen (a timeout): the
/// write is redone on the current version. A Lease gone (404) was deleted
/// by a reader that charged its slices.
pub async fn write(
    api: &Api<Lease>,
    quota: &StintQuota,
    held: &ReplicaSlices,
    last: Option<&str>,
) -> Result<Wrote, SliceLeaseError> {
    let qname = quota.metadata.name.clone().unwrap_or_default();
    let name = lease_name(&qname, &held.replica);
    let mut lease = lease_object(quota, &name, held)?;
    let mut version = last.map(str::to_string);
    for _ in 0..3 {
        lease.metadata.resource_version = version.clone();
        lease.spec.get_or_insert_default().renew_time = Some(MicroTime(jiff::Timestamp::now()));
        let pp = PostParams::default();
        let res = match &version {
            None => api.create(&pp, &lease).await,
            Some(_) => api.replace(&name, &pp, &lease).await,
        };
        match res {
            Ok(l) => return Ok(Wrote::Ok(l.metadata.resource_version.unwrap_or_default())),
            Err(kube::Error::Api(ae)) if ae.code == 404 => return Ok(Wrote::Reclaimed),
            Err(kube::Error::Api(ae)) if ae.code == 409 => {
                version = api.get(&name).await?.metadata.resource_version;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(SliceLeaseError::Contended(name))
}

/// The Lease object carrying `held`, owned by `quota`.
fn lease_object(
    quota: &StintQuota,
    name: &str,
    held: &ReplicaSlices,
) -> Result<Lease, SliceLeaseError> {
    let qname = quota.metadata.name.clone().unwrap_or_default();
    let owner = quota.metadata.uid.clone().map(|uid| OwnerReference {
        api_version: "copyhold.dev/v1alpha1".into(),
        kind: "StintQuota".into(),
        name: qname.clone(),
        uid,
        ..Default::default()
    });
    let json =
        serde_json::to_string(held).map_err(|e| SliceLeaseError::Annotation(name.into(), e))?;
    Ok(Lease {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(BTreeMap::from([(SLICES_LABEL.into(), quota_label(&qname))])),
            annotations: Some(BTreeMap::from([
                (SLICES_ANNOTATION.into(), json),
                (QUOTA_ANNOTATION.into(), qname),
            ])),
            owner_references: owner.map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(held.replica.clone()),
            ..Default::default()
        }),
    })
}

/// Delete a dead replica's Lease, only as it was when charged.
pub async fn delete(api: &Api<Lease>, name: &str, resource_version: &str) {
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            resource_version: Some(resource_version.to_string()),
            uid: None,
        }),
        ..Default::default()
    };
    if let Err(e) = api.delete(name, &dp).await {
        tracing::debug!(lease = %name, error = %e, "deleting a charged slice Lease");
    }
}

/// The whole register of a quota as the ledger sees it: its status with
/// every live replica's slices and heartbeat filled in from their Leases
/// (for tests and tools; the ledger does this in each write).
pub async fn register(
    client: &kube::Client,
    namespace: &str,
    quota: &str,
) -> Result<StintQuotaStatus, SliceLeaseError> {
    let leases = list(&Api::namespaced(client.clone(), namespace), quota).await?;
    let q: StintQuota = Api::namespaced(client.clone(), namespace)
        .get_status(quota)
        .await?;
    let mut st = q.status.unwrap_or_default();
    st.hydrate_history();
    let none = ReplicaSlices::default();
    crate::commons::ledger_leases::assemble(&mut st, &leases, &none, jiff::Timestamp::now());
    // `assemble` adds the (here anonymous) reader as a replica.
    st.gateways.retain(|g| !g.name.is_empty());
    Ok(st)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commons::ledger_leases::own_slices;
    use crate::commons::maxima::{
        ETCD_LIMIT, register_at_maxima, replica_names, spec_at_maxima, stored,
    };

    /// The API server refuses annotations over 256 KiB in all.
    const ANNOTATIONS_LIMIT: usize = 256 * 1024;

    #[test]
    fn a_replicas_slice_lease_at_the_schemas_maxima_stays_small() {
        let sp = spec_at_maxima();
        let replicas = replica_names(5);
        let st = register_at_maxima(&sp, &replicas);
        let q = stored(&sp, &st);
        let held = ReplicaSlices {
            replica: replicas[0].clone(),
            beats: i64::MAX,
            slices: own_slices(&st, &replicas[0]),
        };
        assert_eq!(held.slices.len(), 1000, "a slice of every member");
        let name = lease_name("q", &held.replica);
        let mut lease = lease_object(&q, &name, &held).expect("lease");
        lease.metadata.namespace = q.metadata.namespace.clone();
        lease.metadata.resource_version = Some("18446744073709551615".into());
        let annotations: usize = lease
            .metadata
            .annotations
            .iter()
            .flatten()
            .map(|(k, v)| k.len() + v.len())
            .sum();
        let total = serde_json::to_vec(&lease).expect("serializes").len();
        println!(
            "slice Lease at maxima: {total} bytes ({:.1} % of etcd's {ETCD_LIMIT}), \
             annotations {annotations} of {ANNOTATIONS_LIMIT}",
            100.0 * total as f64 / ETCD_LIMIT as f64
        );
        assert!(annotations <= ANNOTATIONS_LIMIT / 2, "{annotations} bytes");
        assert!(total <= ETCD_LIMIT / 10, "{total} bytes");
    }
}
