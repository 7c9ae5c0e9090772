//! What a running Deployment keeps between placements: where it runs
//! (placement is sticky) and how many replicas its last placement found
//! room for (so a shedding still reaches it when placement fails).
//!
//! The controller records, on the Deployment it applies, the replicas, the
//! ModelDeployment's generation and its `copyhold.dev/replace` value that
//! placement decided for. The decisions here are pure; [`scale`] is the one
//! write.

use k8s_openapi::api::apps::v1::Deployment;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};

use crate::error::Result;
use crate::resources::ModelDeployment;
use crate::serving::placement;

/// Annotation on a ModelDeployment: a new value asks for a fresh placement
/// (the model may move to a better card); the same value again does not.
pub const REPLACE_ANNOTATION: &str = "copyhold.dev/replace";
/// Annotation on the Deployment: the replicas its last placement found
/// room for.
pub const PLACED_REPLICAS: &str = "copyhold.dev/placed-replicas";
/// Annotation on the Deployment: the ModelDeployment's generation it was
/// placed for.
pub const PLACED_GENERATION: &str = "copyhold.dev/placed-generation";
/// Annotation on the Deployment: the ModelDeployment's
/// [`REPLACE_ANNOTATION`] value it was placed for (empty when none).
pub const PLACED_REPLACE: &str = "copyhold.dev/placed-replace";
/// Annotation on the Deployment: a hash of the ModelDeployment's spec it
/// was placed for, its replicas left out: a scale (spec.replicas raised or
/// lowered) is no new spec for placement, and the running replicas stay
/// where they run.
pub const PLACED_SPEC: &str = "copyhold.dev/placed-spec";

/// Field manager of a scale of a kept Deployment. Not the controller's own
/// (`copyhold`): an apply of `spec.replicas` alone under that manager would
/// remove every other field it owns, the whole Deployment; its next full
/// apply takes `spec.replicas` back.
pub const SCALE_FIELD_MANAGER: &str = "copyhold-scale";

fn replace_of(md: &ModelDeployment) -> String {
    md.annotations()
        .get(REPLACE_ANNOTATION)
        .cloned()
        .unwrap_or_default()
}

/// A hash of `md`'s spec without its replicas (FNV-1a over its JSON:
/// stable across processes and releases). `None` only if the spec cannot
/// be written as JSON.
pub fn spec_hash(md: &ModelDeployment) -> Option<String> {
    let mut spec = md.spec.clone();
    spec.replicas = 0;
    let bytes = serde_json::to_vec(&spec).ok()?;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    Some(format!("{h:016x}"))
}

/// Record on `dep` (about to be applied) what placement decided it for.
pub fn mark(md: &ModelDeployment, dep: &mut Deployment, replicas: i32) {
    let spec = spec_hash(md);
    let ann = dep.annotations_mut();
    ann.insert(PLACED_REPLICAS.into(), replicas.to_string());
    if let Some(g) = md.metadata.generation {
        ann.insert(PLACED_GENERATION.into(), g.to_string());
    }
    if let Some(spec) = spec {
        ann.insert(PLACED_SPEC.into(), spec);
    }
    ann.insert(PLACED_REPLACE.into(), replace_of(md));
}

/// Where `md`'s running Deployment keeps it: its classes and GPUs per
/// replica, unless the spec changed since it was placed (other than in its
/// replicas: a hash other than the one recorded; a generation other than
/// the one recorded where no hash was) or its owner asked for a new
/// placement (a `copyhold.dev/replace` value other than the one recorded).
/// A Deployment without a recorded generation (made by an older
/// controller) is kept: moving every model on an upgrade is the churn this
/// avoids.
pub fn current(md: &ModelDeployment, dep: Option<&Deployment>) -> Option<placement::Current> {
    let dep = dep.filter(|d| d.metadata.deletion_timestamp.is_none())?;
    let ann = dep.annotations();
    let generation = ann.get(PLACED_GENERATION);
    let same_spec = match (ann.get(PLACED_SPEC), generation, md.metadata.generation) {
        (Some(recorded), _, _) => Some(recorded) == spec_hash(md).as_ref(),
        (None, Some(recorded), Some(now)) => recorded.parse::<i64>().ok() == Some(now),
        _ => true,
    };
    let recorded_replace = ann.get(PLACED_REPLACE).cloned().unwrap_or_default();
    if !same_spec || recorded_replace != replace_of(md) {
        return None;
    }
    placement::current_of(dep.spec.as_ref()?.template.spec.as_ref()?)
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

    fn md(generation: i64, replace: Option<&str>) -> ModelDeployment {
        let mut md: ModelDeployment = serde_json::from_value(serde_json::json!({
            "apiVersion": "copyhold.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "m", "namespace": "n", "generation": generation},
            "spec": {"model": {"source": {"hostPath": {"path": "/m"}}}}
        }))
        .unwrap();
        if let Some(r) = replace {
            md.annotations_mut()
                .insert(REPLACE_ANNOTATION.into(), r.into());
        }
        md
    }

    /// A Deployment running on a P40 with one GPU per replica.
    fn on_p40(replicas: i32) -> Deployment {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "m"},
            "spec": {"replicas": replicas, "selector": {},
                "template": {"spec": {
                    "nodeSelector": {placement::PRODUCT_LABEL: "Tesla-P40"},
                    "containers": [{"name": "c",
                        "resources": {"limits": {placement::GPU_RESOURCE: "1"}}}]}}}
        }))
        .unwrap()
    }

    fn p40() -> Option<placement::Current> {
        Some(placement::Current {
            classes: vec!["Tesla-P40".into()],
            gpus_per_replica: 1,
        })
    }

    #[test]
    fn a_deployment_placed_for_this_spec_keeps_its_card() {
        let m = md(3, None);
        let mut d = on_p40(1);
        mark(&m, &mut d, 1);
        assert_eq!(current(&m, Some(&d)), p40());
        // Made by an older controller (nothing recorded): kept too.
        assert_eq!(current(&m, Some(&on_p40(1))), p40());
        assert_eq!(current(&m, None), None);
    }

    #[test]
    fn a_new_spec_or_a_new_replace_value_places_afresh() {
        let mut d = on_p40(1);
        mark(&md(3, Some("a")), &mut d, 1);
        assert_eq!(current(&md(3, Some("a")), Some(&d)), p40());
        let mut new_spec = md(4, Some("a"));
        new_spec.spec.serving.context_length = 1234;
        assert_eq!(current(&new_spec, Some(&d)), None);
        // Recorded by a controller that kept no spec hash: the generation.
        d.annotations_mut().remove(PLACED_SPEC);
        assert_eq!(current(&md(4, Some("a")), Some(&d)), None);
        assert_eq!(current(&md(3, Some("b")), Some(&d)), None);
        assert_eq!(current(&md(3, None), Some(&d)), None);
    }

    #[test]
    fn a_scale_is_no_new_spec_for_placement() {
        let mut d = on_p40(2);
        let placed = md(3, None);
        mark(&placed, &mut d, 2);
        // spec.replicas raised: a new generation, the same spec otherwise.
        let mut scaled = md(4, None);
        scaled.spec.replicas = 5;
        assert_eq!(current(&scaled, Some(&d)), p40());
        // Anything else changed: placed afresh.
        let mut changed = md(4, None);
        changed.spec.serving.context_length = 1234;
        assert_eq!(current(&changed, Some(&d)), None);
    }

    #[test]
    fn a_kept_deployment_follows_a_shed_down_but_grows_only_to_its_placed_replicas() {
        let mut d = on_p40(3);
        mark(&md(1, None), &mut d, 3);
        assert_eq!(kept_replicas(1, &d), Some(1));
        assert_eq!(kept_replicas(3, &d), None);
        assert_eq!(kept_replicas(5, &d), None);
        // Shed to 1 earlier; the budget gives the replicas back.
        d.spec.as_mut().unwrap().replicas = Some(1);
        assert_eq!(kept_replicas(3, &d), Some(3));
        assert_eq!(kept_replicas(5, &d), Some(3));
        // Nothing recorded: never above what it runs.
        let old = on_p40(2);
        assert_eq!(kept_replicas(4, &old), None);
        assert_eq!(kept_replicas(0, &old), Some(0));
    }
}
