//! The statuses this controller wrote and its cache does not show yet.
//!
//! A reconcile reads its ModelDeployment from the watch-fed cache, which
//! shows a status write some milliseconds after the API server took it.
//! Reconciles queued meanwhile (by the Deployment, its Pods) ran on the
//! version from before the write: they saw an older status, wrote the same
//! status again, and on this Kubernetes (before 1.23) each such write is a
//! new resourceVersion, so one more watch event and reconcile, and a
//! condition they thought new got a new `lastTransitionTime`. Here each
//! write is remembered with the version it was computed from: a reconcile
//! that still sees that version starts from the status written instead.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;

use crate::resources::{ModelDeployment, ModelDeploymentStatus};

/// One write: the object's uid and the resourceVersion the status was
/// computed from.
struct Written {
    uid: Option<String>,
    from: Option<String>,
    status: ModelDeploymentStatus,
    at: Instant,
}

/// The last status written per ModelDeployment, until the cache shows a
/// newer version of it.
#[derive(Default)]
pub struct Statuses {
    written: Mutex<HashMap<ObjectRef<ModelDeployment>, Written>>,
}

impl Statuses {
    /// A write older than this is forgotten even if its object was never
    /// seen again (deleted meanwhile): a watch shows a write in far less.
    const FORGET_AFTER: Duration = Duration::from_secs(120);

    /// The newest status of `md` this controller knows: the one it wrote
    /// when `md` is still the version that write was computed from (the
    /// cache has not caught up), else the one `md` carries.
    pub fn newest(&self, md: &ModelDeployment) -> Option<ModelDeploymentStatus> {
        let key = ObjectRef::from_obj(md);
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        match written.get(&key) {
            Some(w) if w.uid == md.uid() && w.from == md.resource_version() => {
                return Some(w.status.clone());
            }
            // The cache moved on: it shows this write or a later one.
            Some(_) => {
                written.remove(&key);
            }
            None => {}
        }
        md.status.clone()
    }

    /// Remember that `status` was written for `md` (the version it was
    /// computed from).
    pub fn wrote(&self, md: &ModelDeployment, status: &ModelDeploymentStatus) {
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        written.retain(|_, w| w.at.elapsed() < Self::FORGET_AFTER);
        written.insert(
            ObjectRef::from_obj(md),
            Written {
                uid: md.uid(),
                from: md.resource_version(),
                status: status.clone(),
                at: Instant::now(),
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn md(version: &str, state: Option<&str>) -> ModelDeployment {
        let mut md: ModelDeployment = serde_json::from_value(json!({
            "apiVersion": "copyhold.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "m", "namespace": "n", "uid": "u1", "resourceVersion": version},
            "spec": {"model": {"source": {"hostPath": {"path": "/m"}}}},
        }))
        .expect("a ModelDeployment");
        md.status = state.map(|s| ModelDeploymentStatus {
            state: Some(s.into()),
            ..Default::default()
        });
        md
    }

    #[test]
    fn a_reconcile_on_the_version_before_a_write_starts_from_the_status_written() {
        let statuses = Statuses::default();
        let before = md("1", None);
        let placed = ModelDeploymentStatus {
            state: Some("Pending".into()),
            ..Default::default()
        };
        statuses.wrote(&before, &placed);
        assert_eq!(statuses.newest(&before), Some(placed));
    }

    #[test]
    fn once_the_cache_shows_a_newer_version_its_status_counts() {
        let statuses = Statuses::default();
        let before = md("1", None);
        statuses.wrote(
            &before,
            &ModelDeploymentStatus {
                state: Some("Pending".into()),
                ..Default::default()
            },
        );
        // Another writer's status after ours: the cache is the truth.
        let later = md("3", Some("Ready"));
        assert_eq!(
            statuses.newest(&later).and_then(|s| s.state),
            Some("Ready".into())
        );
        // And the write is forgotten.
        assert_eq!(statuses.newest(&before), None);
    }
}
