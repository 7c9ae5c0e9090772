//! What a running Deployment keeps between placements: how many replicas
//! its last placement found room for (so a shedding still reaches it when
//! placement fails).
//!
//! The controller records, on the Deployment it applies, the replicas that
//! placement decided for. The decisions here are pure; [`scale`] is the one
//! write.

use k8s_openapi::api::apps::v1::Deployment;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};

use crate::error::Result;

/// Annotation on the Deployment: the replicas its last placement found
/// room for.
pub const PLACED_REPLICAS: &str = "copyhold.dev/placed-replicas";
/// Field manager of a scale of a kept Deployment. Not the controller's own
/// (`copyhold`): an apply of `spec.replicas` alone under that manager would
/// remove every other field it owns, the whole Deployment; its next full
/// apply takes `spec.replicas` back.
pub const SCALE_FIELD_MANAGER: &str = "copyhold-scale";

/// Record on `dep` (about to be applied) what placement decided it for.
pub fn mark(dep: &mut Deployment, replicas: i32) {
    let ann = dep.annotations_mut();
    ann.insert(PLACED_REPLICAS.into(), replicas.to_string());
}

/// The replicas a Deployment kept while placement fails should run:
/// `wanted` (the spec's, the autoscaler's or an EnergyBudget's shed-to),
/// but no more than its last placement found room for (its own replicas
/// when nothing was recorded). `None` when it runs that already.
pub fn kept_replicas(wanted: i32, dep: &Deployment) -> Option<i32> {
    let runs = dep.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let room = dep
        .annotations()
        .get(PLACED_REPLICAS)
        .and_then(|r| r.parse::<i32>().ok())
        .unwrap_or(runs);
    let target = wanted.min(room).max(0);
    (target != runs).then_some(target)
}

/// Scale the kept Deployment `name` to `replicas`: `spec.replicas` alone,
/// by server-side apply. Returns the Deployment as it now is.
pub async fn scale(api: &Api<Deployment>, name: &str, replicas: i32) -> Result<Deployment> {
    let patch = serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {"replicas": replicas},
    });
    Ok(api
        .patch(
            name,
            &PatchParams::apply(SCALE_FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Deployment running `replicas` replicas.
    fn running(replicas: i32) -> Deployment {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "m"},
            "spec": {"replicas": replicas, "selector": {}, "template": {}}
        }))
        .unwrap()
    }

    #[test]
    fn a_kept_deployment_follows_a_shed_down_but_grows_only_to_its_placed_replicas() {
        let mut d = running(3);
        mark(&mut d, 3);
        assert_eq!(kept_replicas(1, &d), Some(1));
        assert_eq!(kept_replicas(3, &d), None);
        assert_eq!(kept_replicas(5, &d), None);
        // Shed to 1 earlier; the budget gives the replicas back.
        d.spec.as_mut().unwrap().replicas = Some(1);
        assert_eq!(kept_replicas(3, &d), Some(3));
        assert_eq!(kept_replicas(5, &d), Some(3));
        // Nothing recorded: never above what it runs.
        let old = running(2);
        assert_eq!(kept_replicas(4, &old), None);
        assert_eq!(kept_replicas(0, &old), Some(0));
    }
}
