//! The statuses this controller wrote and its cache does not show yet.
//!
//! A reconcile reads its ModelDeployment from the watch-fed cache, which
//! shows a status write some milliseconds after the API server took it.
//! Reconciles queued meanwhile (by the Deployment, its Pods) ran on the
//! version from before the write: they saw an older status, wrote the same
//! status again, and on this Kubernetes (before 1.23) each such write is a
//! new resourceVersion, so one more watch event and reconcile, and a
//! condition they thought new got a new `lastTransitionTime`. Here each
//! write is remembered with the versions older than it (the one it was
//! computed from, and those earlier writes made): a reconcile that still
//! sees one of them starts from the status written instead.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;

use crate::resources::{ModelDeployment, ModelDeploymentStatus};

/// The last write to one object: its uid, the versions the cache may
/// still show whose status is older than the one written (the version
/// each write was computed from, and those earlier writes made), the
/// version this write made, and the status written.
struct Written {
    uid: Option<String>,
    older: HashSet<String>,
    to: Option<String>,
    status: ModelDeploymentStatus,
    at: Instant,
}

/// The last status written per ModelDeployment, until the cache shows a
/// version newer than every one the writes started from.
#[derive(Default)]
pub struct Statuses {
    written: Mutex<HashMap<ObjectRef<ModelDeployment>, Written>>,
}

impl Statuses {
    /// A write older than this is forgotten even if its object was never
    /// seen again (deleted meanwhile): a watch shows a write in far less.
    const FORGET_AFTER: Duration = Duration::from_secs(120);

    /// The newest status of `md` this controller knows: the one it wrote
    /// last when `md` is a version from before that write (the cache has
    /// not caught up), else the one `md` carries.
    pub fn newest(&self, md: &ModelDeployment) -> Option<ModelDeploymentStatus> {
        let key = ObjectRef::from_obj(md);
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        match written.get(&key) {
            Some(w)
                if w.uid == md.uid()
                    && md.resource_version().is_some_and(|v| w.older.contains(&v)) =>
            {
                return Some(w.status.clone());
            }
            // The cache moved on: it shows the last write or a later one.
            Some(_) => {
                written.remove(&key);
            }
            None => {}
        }
        md.status.clone()
    }

    /// Remember that `status` was written for `md` (the version it was
    /// computed from) and made version `to` (none when the server did not
    /// say: then only `md`'s own version counts as older).
    ///
    /// A reconcile may still run on a version from before an earlier
    /// write of this controller (the cache is behind by two writes): the
    /// versions that earlier write made stay older than this one, or the
    /// cache showing them would start a reconcile from a status already
    /// replaced, and it would write the same status once more.
    pub fn wrote(&self, md: &ModelDeployment, status: &ModelDeploymentStatus, to: Option<String>) {
        let key = ObjectRef::from_obj(md);
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        written.retain(|_, w| w.at.elapsed() < Self::FORGET_AFTER);
        let mut older = HashSet::new();
        if let Some(w) = written.remove(&key).filter(|w| w.uid == md.uid()) {
            older.extend(w.older);
            older.extend(w.to);
        }
        older.extend(md.resource_version());
        written.insert(
            key,
            Written {
                uid: md.uid(),
                older,
                to,
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
        statuses.wrote(&before, &placed, Some("2".into()));
        assert_eq!(statuses.newest(&before), Some(placed));
    }

    fn pending(what: &str) -> ModelDeploymentStatus {
        ModelDeploymentStatus {
            state: Some("Pending".into()),
            gpu_class: Some(what.into()),
            ..Default::default()
        }
    }

    /// A reconcile still ran on version 1 after the first write (1 -> 2)
    /// and wrote again (-> 3); the cache then showed version 2, the first
    /// write. Starting from version 2's status wrote the second status a
    /// third time (CI: "more than 2 status writes").
    #[test]
    fn a_reconcile_on_a_version_between_two_writes_starts_from_the_last_status_written() {
        let statuses = Statuses::default();
        let v1 = md("1", None);
        statuses.wrote(&v1, &pending("planned"), Some("2".into()));
        statuses.wrote(&v1, &pending("bound"), Some("3".into()));
        let mut v2 = md("2", None);
        v2.status = Some(pending("planned"));
        assert_eq!(statuses.newest(&v2), Some(pending("bound")));
        let mut v3 = md("3", None);
        v3.status = Some(pending("bound"));
        assert_eq!(statuses.newest(&v3), Some(pending("bound")));
        // Caught up: the write is forgotten.
        assert_eq!(statuses.newest(&v1), None);
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
            Some("2".into()),
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
