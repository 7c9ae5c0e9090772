//! The Deployment and Service a ModelDeployment becomes. Pure: the same
//! inputs give the same objects, byte for byte, so applying them again is a
//! no-op on the API server. Only fields Kubernetes 1.20 knows are set.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Affinity, Service};
use kube::Resource;
use kube::ResourceExt;
use serde_json::json;

use crate::resources::{EngineKind, ModelDeployment};

/// Port the engine listens on inside the Pod (OpenAI API, /health, /metrics).
pub const ENGINE_PORT: i32 = 8000;
/// Where the model is mounted.
pub const MODEL_DIR: &str = "/models";
/// Label naming the owning ModelDeployment.
pub const MD_LABEL: &str = "copyhold.dev/model-deployment";
/// Label carrying the ModelDeployment's priority (for the energy ladder).
pub const PRIORITY_LABEL: &str = "copyhold.dev/priority";

/// Annotation an EnergyBudget sets on a ModelDeployment it sheds: the
/// replicas to run while shed. Written by the budget's own field manager;
/// removing it restores `spec.replicas`.
pub const SHED_TO_ANNOTATION: &str = "copyhold.dev/shed-to";
/// Annotation naming the EnergyBudget that sheds the ModelDeployment.
pub const SHED_BY_ANNOTATION: &str = "copyhold.dev/shed-by";

/// A shedding in force on a ModelDeployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shedding {
    /// The EnergyBudget that sheds.
    pub budget: String,
    /// Replicas run while shed.
    pub replicas: i32,
}

/// Replicas the Deployment runs: `spec.replicas`, or while an EnergyBudget
/// sheds, `max(minReplicas, min(spec.replicas, shed-to))`. A malformed
/// annotation is ignored (the spec wins), and `essential` is never shed.
pub fn effective_replicas(md: &ModelDeployment) -> (i32, Option<Shedding>) {
    let want = md.spec.replicas;
    if md.spec.priority == crate::resources::Priority::Essential {
        return (want, None);
    }
    let ann = md.annotations();
    let Some(to) = ann
        .get(SHED_TO_ANNOTATION)
        .and_then(|v| v.trim().parse::<i32>().ok())
    else {
        return (want, None);
    };
    let min = md
        .spec
        .autoscaling
        .as_ref()
        .map_or(0, |a| a.min_replicas)
        .max(0);
    let replicas = min.max(to.min(want)).min(want);
    if replicas >= want {
        return (want, None);
    }
    let budget = ann
        .get(SHED_BY_ANNOTATION)
        .cloned()
        .unwrap_or_else(|| "an EnergyBudget".into());
    (replicas, Some(Shedding { budget, replicas }))
}

/// Where a copyhold-node Pod's admin token Secret is mounted.
pub const ADMIN_TOKEN_DIR: &str = "/var/run/copyhold/admin";
/// The key of the admin token Secret that holds the token (and the file
/// name under [`ADMIN_TOKEN_DIR`]).
pub const ADMIN_TOKEN_KEY: &str = "token";

/// Controller-wide defaults for the engine containers.
#[derive(Clone, Debug)]
pub struct EngineDefaults {
    pub copyhold_image: String,
    pub vllm_image: String,
    /// `--device` given to copyhold-node (`cuda` on real GPU nodes).
    pub node_device: String,
    /// Name of the Secret (in each ModelDeployment's own namespace, key
    /// `token`) mounted into every copyhold-node Pod as its
    /// `--admin-token-file`: what EnergyBudgets' power caps authenticate
    /// with. `None`: the nodes' admin API stays disabled.
    pub admin_token_secret: Option<String>,
    /// The node model cache of `huggingFace` sources.
    pub model_cache: crate::model_cache::ModelCacheVolume,
    /// Size limit of the cache; the fetcher evicts least-recently-used
    /// models no ModelDeployment uses beyond it.
    pub model_cache_max_bytes: Option<u64>,
}

impl Default for EngineDefaults {
    fn default() -> Self {
        Self {
            copyhold_image: format!(
                "ghcr.io/copyhold/copyhold-node:{}",
                env!("CARGO_PKG_VERSION")
            ),
            vllm_image: "vllm/vllm-openai:v0.11.0".into(),
            node_device: "cuda".into(),
            admin_token_secret: None,
            model_cache: Default::default(),
            model_cache_max_bytes: None,
        }
    }
}

/// Why a Deployment cannot be built.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WorkloadError {
    #[error("the ModelDeployment has no uid yet")]
    NoUid,
    #[error(
        "model source `{0}` cannot be mounted by the engine yet: use hostPath or pvc (the model is read where it lies)"
    )]
    UnsupportedSource(&'static str),
    #[error("model.source names no source")]
    NoSource,
    #[error("building the {0}: {1}")]
    Shape(&'static str, String),
}

/// What placement decided, as far as the Deployment is concerned.
#[derive(Clone, Debug)]
pub struct PlacementForWorkload {
    pub replicas: i32,
    pub gpus_per_replica: u32,
    pub affinity: Affinity,
}

/// The selector of a ModelDeployment's Pods (immutable once created, so it
/// names nothing that a spec change could alter).
pub fn selector_labels(md_name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/instance".to_string(),
            md_name.to_string(),
        ),
        (MD_LABEL.to_string(), md_name.to_string()),
    ])
}

/// `a=b,c=d` form of the selector, for the scale subresource.
pub fn selector_string(md_name: &str) -> String {
    selector_labels(md_name)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn labels(md: &ModelDeployment) -> BTreeMap<String, String> {
    let mut l = selector_labels(&md.name_any());
    let engine = match md.spec.engine.kind {
        EngineKind::Copyhold => "copyhold-node",
        EngineKind::Vllm => "vllm",
    };
    l.insert("app.kubernetes.io/name".into(), engine.into());
    l.insert("app.kubernetes.io/component".into(), "inference".into());
    l.insert("app.kubernetes.io/part-of".into(), "copyhold".into());
    l.insert("app.kubernetes.io/managed-by".into(), "copyhold".into());
    l.insert(PRIORITY_LABEL.into(), md.spec.priority.as_str().into());
    l
}

/// The name clients use in the request's `model` field.
pub fn served_model_name(md: &ModelDeployment) -> String {
    md.spec
        .model
        .served_name
        .clone()
        .unwrap_or_else(|| md.name_any())
}

/// In-cluster URL of the OpenAI-compatible API.
pub fn endpoint(md: &ModelDeployment) -> String {
    format!(
        "http://{}.{}.svc:80/v1",
        md.name_any(),
        md.namespace().unwrap_or_else(|| "default".into())
    )
}

/// The Deployment serving `md`.
pub fn deployment(
    md: &ModelDeployment,
    placement: &PlacementForWorkload,
    defaults: &EngineDefaults,
) -> Result<Deployment, WorkloadError> {
    let owner = md.controller_owner_ref(&()).ok_or(WorkloadError::NoUid)?;
    let name = md.name_any();
    let served = served_model_name(md);
    let src = &md.spec.model.source;
    let mut model_path = MODEL_DIR.to_string();
    let (volume, sub_path) = if let Some(hf) = &src.hugging_face {
        model_path = crate::model_cache::model_path(hf);
        (crate::model_cache::volume(&defaults.model_cache), None)
    } else if let Some(h) = &src.host_path {
        (
            json!({"name": "model", "hostPath": {"path": h.path, "type": "Directory"}}),
            None,
        )
    } else if let Some(p) = &src.pvc {
        (
            json!({"name": "model", "persistentVolumeClaim": {"claimName": p.claim_name, "readOnly": true}}),
            p.sub_path.clone(),
        )
    } else if src.http.is_some() {
        return Err(WorkloadError::UnsupportedSource("http"));
    } else if src.oci.is_some() {
        return Err(WorkloadError::UnsupportedSource("oci"));
    } else {
        return Err(WorkloadError::NoSource);
    };
    let serving = &md.spec.serving;
    let gpus = placement.gpus_per_replica;
    let (image, command, mut args): (String, Vec<String>, Vec<String>) = match md.spec.engine.kind {
        EngineKind::Copyhold => (
            md.spec
                .engine
                .image
                .clone()
                .unwrap_or_else(|| defaults.copyhold_image.clone()),
            vec!["copyhold-node".into()],
            vec![
                "serve".into(),
                "--model".into(),
                model_path.clone(),
                "--host".into(),
                "0.0.0.0".into(),
                "--port".into(),
                ENGINE_PORT.to_string(),
                "--served-model-name".into(),
                served.clone(),
                "--device".into(),
                defaults.node_device.clone(),
            ],
        ),
        EngineKind::Vllm => (
            md.spec
                .engine
                .image
                .clone()
                .unwrap_or_else(|| defaults.vllm_image.clone()),
            vec!["vllm".into()],
            vec![
                "serve".into(),
                model_path.clone(),
                "--host".into(),
                "0.0.0.0".into(),
                "--port".into(),
                ENGINE_PORT.to_string(),
                "--served-model-name".into(),
                served.clone(),
                "--max-model-len".into(),
                serving.context_length.to_string(),
                "--max-num-seqs".into(),
                serving.max_concurrent_sequences.to_string(),
                "--gpu-memory-utilization".into(),
                serving.gpu_memory_utilization.to_string(),
                // Layers split across the node's GPUs, as our own engine does.
                "--pipeline-parallel-size".into(),
                gpus.to_string(),
            ],
        ),
    };
    // The admin token: a read-only Secret volume, for copyhold-node only
    // (vLLM has no such endpoint). Not optional: a node started without
    // its token file would exit, so the Pod waits for the Secret instead
    // (kubelet reports `FailedMount` naming it).
    let admin_secret = match md.spec.engine.kind {
        EngineKind::Copyhold => defaults.admin_token_secret.as_deref(),
        EngineKind::Vllm => None,
    };
    if admin_secret.is_some() {
        args.push("--admin-token-file".into());
        args.push(format!("{ADMIN_TOKEN_DIR}/{ADMIN_TOKEN_KEY}"));
    }
    args.extend(md.spec.engine.args.iter().cloned());
    let env: Vec<_> = md
        .spec
        .engine
        .env
        .iter()
        .map(|(k, v)| json!({"name": k, "value": v}))
        .collect();

    let mut limits = serde_json::Map::new();
    let mut requests = serde_json::Map::new();
    if let Some(r) = &serving.resources {
        for (k, v) in r.limits.iter().flatten() {
            limits.insert(k.clone(), json!(v.0));
        }
        for (k, v) in r.requests.iter().flatten() {
            requests.insert(k.clone(), json!(v.0));
        }
    }
    if gpus > 0 {
        limits.insert("nvidia.com/gpu".into(), json!(gpus.to_string()));
    }
    let mut resources = json!({"limits": limits});
    if !requests.is_empty() {
        resources["requests"] = json!(requests);
    }

    let mount_path = if src.hugging_face.is_some() {
        crate::model_cache::MODEL_CACHE_DIR
    } else {
        MODEL_DIR
    };
    let mut mount = json!({"name": "model", "mountPath": mount_path, "readOnly": true});
    if let Some(sp) = sub_path {
        mount["subPath"] = json!(sp);
    }
    let mut mounts = vec![
        mount,
        json!({"name": "tmp", "mountPath": "/tmp"}),
        json!({"name": "cache", "mountPath": "/var/cache/copyhold"}),
    ];
    let mut volumes = vec![
        volume,
        json!({"name": "tmp", "emptyDir": {}}),
        json!({"name": "cache", "emptyDir": {}}),
    ];
    if let Some(secret) = admin_secret {
        mounts.push(json!({"name": "admin-token", "mountPath": ADMIN_TOKEN_DIR, "readOnly": true}));
        // 0400; the kubelet adds group read for the Pod's fsGroup, which is
        // how the engine's non-root user reads it.
        volumes.push(json!({"name": "admin-token", "secret": {
            "secretName": secret,
            "defaultMode": 0o400,
            "items": [{"key": ADMIN_TOKEN_KEY, "path": ADMIN_TOKEN_KEY}],
        }}));
    }
    let security = json!({
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "runAsNonRoot": true,
        "capabilities": {"drop": ["ALL"]},
    });
    let mut init_containers = Vec::new();
    if let Some(hf) = &src.hugging_face {
        init_containers.push(crate::model_cache::fetch_container(
            hf,
            &defaults.copyhold_image,
            defaults.model_cache_max_bytes,
            &security,
        ));
        volumes.extend(crate::model_cache::token_volume(hf));
    }
    let labels = labels(md);
    let value = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": md.namespace(),
            "labels": labels,
            "ownerReferences": [owner],
        },
        "spec": {
            "replicas": placement.replicas,
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": selector_labels(&name)},
            // GPUs are scarce: replace a replica in place rather than surge.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "automountServiceAccountToken": false,
                    "enableServiceLinks": false,
                    "terminationGracePeriodSeconds": 30,
                    "securityContext": {
                        "runAsNonRoot": true,
                        "runAsUser": 65532,
                        "runAsGroup": 65532,
                        "fsGroup": 65532,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "affinity": placement.affinity,
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "initContainers": init_containers,
                    "containers": [{
                        "name": "engine",
                        "image": image,
                        "command": command,
                        "args": args,
                        "env": env,
                        "ports": [{"name": "http", "containerPort": ENGINE_PORT, "protocol": "TCP"}],
                        "resources": resources,
                        "volumeMounts": mounts,
                        "startupProbe": {
                            "httpGet": {"path": "/health", "port": "http"},
                            "periodSeconds": 5, "failureThreshold": 360,
                        },
                        "readinessProbe": {
                            "httpGet": {"path": "/health", "port": "http"},
                            "periodSeconds": 5, "failureThreshold": 2,
                        },
                        "livenessProbe": {
                            "httpGet": {"path": "/health", "port": "http"},
                            "periodSeconds": 10, "failureThreshold": 6,
                        },
                        "securityContext": security,
                    }],
                    "volumes": volumes,
                },
            },
        },
    });
    serde_json::from_value(value).map_err(|e| WorkloadError::Shape("Deployment", e.to_string()))
}

/// The Service in front of `md`'s replicas.
pub fn service(md: &ModelDeployment) -> Result<Service, WorkloadError> {
    let owner = md.controller_owner_ref(&()).ok_or(WorkloadError::NoUid)?;
    let name = md.name_any();
    let value = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": md.namespace(),
            "labels": labels(md),
            "ownerReferences": [owner],
        },
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(&name),
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
        },
    });
    serde_json::from_value(value).map_err(|e| WorkloadError::Shape("Service", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(yaml: &str) -> ModelDeployment {
        let mut md: ModelDeployment = serde_yaml::from_str(yaml).expect("valid test manifest");
        md.metadata.uid = Some("1234".into());
        md.metadata.namespace = Some("town".into());
        md
    }

    const BASIC: &str = r#"
apiVersion: copyhold.dev/v1alpha1
kind: ModelDeployment
metadata: {name: tiny}
spec:
  model: {source: {hostPath: {path: /srv/models/tiny}}}
  replicas: 2
"#;

    fn placed(gpus: u32) -> PlacementForWorkload {
        PlacementForWorkload {
            replicas: 2,
            gpus_per_replica: gpus,
            affinity: Affinity::default(),
        }
    }

    fn shed(priority: &str, min: i32, to: &str) -> ModelDeployment {
        let mut m = md(&format!(
            "{BASIC}  priority: {priority}\n  autoscaling: {{minReplicas: {min}, maxReplicas: 4}}\n"
        ));
        m.annotations_mut()
            .insert(SHED_TO_ANNOTATION.into(), to.into());
        m.annotations_mut()
            .insert(SHED_BY_ANNOTATION.into(), "solar".into());
        m
    }

    #[test]
    fn a_shed_annotation_runs_fewer_replicas_but_never_below_the_minimum() {
        assert_eq!(
            effective_replicas(&shed("deferrable", 1, "1")),
            (
                1,
                Some(Shedding {
                    budget: "solar".into(),
                    replicas: 1
                })
            )
        );
        assert_eq!(effective_replicas(&shed("deferrable", 1, "0")).0, 1);
        assert_eq!(effective_replicas(&shed("standard", 0, "0")).0, 0);
    }

    #[test]
    fn essential_and_malformed_shed_annotations_keep_the_spec() {
        assert_eq!(effective_replicas(&shed("essential", 0, "0")), (2, None));
        assert_eq!(
            effective_replicas(&shed("deferrable", 0, "lots")),
            (2, None)
        );
        assert_eq!(effective_replicas(&shed("deferrable", 0, "5")), (2, None));
        assert_eq!(effective_replicas(&md(BASIC)), (2, None));
    }

    #[test]
    fn the_deployment_is_owned_labelled_and_asks_for_its_gpus() {
        let d = deployment(&md(BASIC), &placed(2), &EngineDefaults::default()).expect("builds");
        let owner = &d.metadata.owner_references.as_ref().expect("owned")[0];
        assert_eq!(owner.kind, "ModelDeployment");
        assert_eq!(owner.controller, Some(true));
        let spec = d.spec.as_ref().expect("spec");
        assert_eq!(spec.replicas, Some(2));
        let pod = spec.template.spec.as_ref().expect("pod spec");
        let c = &pod.containers[0];
        let limits = c
            .resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .expect("limits");
        assert_eq!(
            limits.get("nvidia.com/gpu").map(|q| q.0.as_str()),
            Some("2")
        );
        assert_eq!(
            c.command.as_deref(),
            Some(&["copyhold-node".to_string()][..])
        );
        let args = c.args.clone().unwrap_or_default().join(" ");
        assert!(args.contains("serve --model /models"), "{args}");
        assert!(args.contains("--served-model-name tiny"), "{args}");
        let labels = d.metadata.labels.as_ref().expect("labels");
        assert_eq!(
            labels
                .get("app.kubernetes.io/managed-by")
                .map(String::as_str),
            Some("copyhold")
        );
        assert_eq!(
            labels.get(PRIORITY_LABEL).map(String::as_str),
            Some("standard")
        );
    }

    #[test]
    fn the_engine_runs_locked_down_with_the_model_read_only() {
        let d = deployment(&md(BASIC), &placed(1), &EngineDefaults::default()).expect("builds");
        let pod = d.spec.and_then(|s| s.template.spec).expect("pod");
        let sc = pod.containers[0]
            .security_context
            .clone()
            .expect("security context");
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.and_then(|c| c.drop),
            Some(vec!["ALL".to_string()])
        );
        let mount = &pod.containers[0].volume_mounts.clone().unwrap_or_default()[0];
        assert_eq!(
            (mount.mount_path.as_str(), mount.read_only),
            (MODEL_DIR, Some(true))
        );
        assert_eq!(
            pod.security_context.and_then(|s| s.run_as_non_root),
            Some(true)
        );
    }

    #[test]
    fn building_twice_gives_identical_objects() {
        let a = deployment(&md(BASIC), &placed(1), &EngineDefaults::default()).expect("builds");
        let b = deployment(&md(BASIC), &placed(1), &EngineDefaults::default()).expect("builds");
        assert_eq!(
            serde_json::to_string(&a).ok(),
            serde_json::to_string(&b).ok()
        );
    }

    #[test]
    fn vllm_gets_its_own_command_and_pipeline_split() {
        let m = md(&BASIC.replace("replicas: 2", "replicas: 2\n  engine: {kind: vllm}"));
        let d = deployment(&m, &placed(2), &EngineDefaults::default()).expect("builds");
        let c = &d
            .spec
            .and_then(|s| s.template.spec)
            .expect("pod")
            .containers[0];
        let args = c.args.clone().unwrap_or_default().join(" ");
        assert!(args.starts_with("serve /models"), "{args}");
        assert!(args.contains("--pipeline-parallel-size 2"), "{args}");
    }

    #[test]
    fn the_admin_token_secret_is_mounted_read_only_as_the_nodes_token_file() {
        let defaults = EngineDefaults {
            admin_token_secret: Some("copyhold-node-admin".into()),
            ..Default::default()
        };
        let d = deployment(&md(BASIC), &placed(1), &defaults).expect("builds");
        let pod = d.spec.and_then(|s| s.template.spec).expect("pod");
        let c = &pod.containers[0];
        let args = c.args.clone().unwrap_or_default().join(" ");
        assert!(
            args.contains("--admin-token-file /var/run/copyhold/admin/token"),
            "{args}"
        );
        let mount = c
            .volume_mounts
            .clone()
            .unwrap_or_default()
            .into_iter()
            .find(|m| m.name == "admin-token")
            .expect("mounted");
        assert_eq!(
            (mount.mount_path.as_str(), mount.read_only),
            (ADMIN_TOKEN_DIR, Some(true))
        );
        let secret = pod
            .volumes
            .unwrap_or_default()
            .into_iter()
            .find(|v| v.name == "admin-token")
            .and_then(|v| v.secret)
            .expect("a secret volume");
        assert_eq!(secret.secret_name.as_deref(), Some("copyhold-node-admin"));
        assert_eq!(secret.default_mode, Some(0o400));
        assert_eq!(secret.optional, None, "the Pod waits for its token");
        let items = secret.items.unwrap_or_default();
        assert_eq!(
            items
                .iter()
                .map(|i| (i.key.as_str(), i.path.as_str()))
                .collect::<Vec<_>>(),
            vec![("token", "token")]
        );
        // Without the setting, or for vLLM, nothing is mounted.
        let plain = deployment(&md(BASIC), &placed(1), &EngineDefaults::default()).expect("builds");
        let text = serde_json::to_string(&plain).unwrap_or_default();
        assert!(!text.contains("admin-token"), "{text}");
        let vllm = md(&BASIC.replace("replicas: 2", "replicas: 2\n  engine: {kind: vllm}"));
        let text =
            serde_json::to_string(&deployment(&vllm, &placed(1), &defaults).expect("builds"))
                .unwrap_or_default();
        assert!(!text.contains("admin-token"), "{text}");
    }

    #[test]
    fn http_sources_are_refused_with_a_reason() {
        let m = md(&BASIC.replace(
            "{hostPath: {path: /srv/models/tiny}}",
            "{http: {url: 'http://models.local/tiny'}}",
        ));
        assert_eq!(
            deployment(&m, &placed(1), &EngineDefaults::default()).err(),
            Some(WorkloadError::UnsupportedSource("http"))
        );
    }

    #[test]
    fn pvc_sources_mount_their_sub_path() {
        let m = md(&BASIC.replace(
            "{hostPath: {path: /srv/models/tiny}}",
            "{pvc: {claimName: models, subPath: qwen}}",
        ));
        let d = deployment(&m, &placed(1), &EngineDefaults::default()).expect("builds");
        let pod = d.spec.and_then(|s| s.template.spec).expect("pod");
        let mount = &pod.containers[0].volume_mounts.clone().unwrap_or_default()[0];
        assert_eq!(mount.sub_path.as_deref(), Some("qwen"));
    }

    #[test]
    fn the_service_selects_the_pods_and_names_http() {
        let s = service(&md(BASIC)).expect("builds");
        let spec = s.spec.expect("spec");
        assert_eq!(spec.selector, Some(selector_labels("tiny")));
        assert_eq!(spec.ports.unwrap_or_default()[0].port, 80);
        assert_eq!(endpoint(&md(BASIC)), "http://tiny.town.svc:80/v1");
    }

    #[test]
    fn a_hugging_face_source_fetches_into_the_cache_before_the_engine_serves_it() {
        let m = md(r#"
apiVersion: copyhold.dev/v1alpha1
kind: ModelDeployment
metadata: {name: tiny}
spec:
  model: {source: {huggingFace: {repo: town/tiny-llama, endpoint: "http://hub.local:8090", tokenSecret: hf}}}
"#);
        let defaults = EngineDefaults {
            model_cache: crate::model_cache::ModelCacheVolume::HostPath("/srv/cache".into()),
            ..Default::default()
        };
        let d = deployment(&m, &placed(1), &defaults).expect("builds");
        let pod = d.spec.and_then(|s| s.template.spec).expect("pod");
        let init = pod.init_containers.clone().unwrap_or_default();
        assert_eq!(init.len(), 1);
        let fetch = init[0].args.clone().unwrap_or_default().join(" ");
        assert!(
            fetch.contains(
                "--repo town/tiny-llama --revision main --endpoint http://hub.local:8090"
            ),
            "{fetch}"
        );
        let engine = pod.containers[0].args.clone().unwrap_or_default().join(" ");
        assert!(
            engine.contains(
                "--model /var/cache/copyhold-models/models/town--tiny-llama/revisions/main"
            ),
            "{engine}"
        );
        let volumes = pod.volumes.unwrap_or_default();
        let cache = volumes
            .iter()
            .find(|v| v.name == "model")
            .expect("cache volume");
        assert_eq!(
            cache.host_path.as_ref().map(|h| h.path.as_str()),
            Some("/srv/cache")
        );
        assert!(volumes.iter().any(|v| v.name == "hf-token"));
    }
}
