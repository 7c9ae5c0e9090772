//! The Deployment and Service a ModelDeployment becomes. Pure: the same
//! inputs give the same objects, byte for byte, so applying them again is a
//! no-op on the API server. Only fields Kubernetes 1.20 knows are set.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, HTTPGetAction,
    HostPathVolumeSource, KeyToPath, LocalObjectReference, PersistentVolumeClaimVolumeSource,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile,
    SecretVolumeSource, SecurityContext, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use kube::ResourceExt;

use super::model_cache;
use crate::resources::model_deployment::ServingSpec;
use crate::resources::quantity;
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
    match shed_cap(md) {
        Some(cap) if cap.replicas < want => (cap.replicas, Some(cap)),
        _ => (want, None),
    }
}

/// The cap an EnergyBudget's shed annotation puts on `md`'s replicas:
/// `max(minReplicas, shed-to)`, naming the budget. `None` when none sheds
/// it, the annotation is malformed, or the model is `essential`.
pub fn shed_cap(md: &ModelDeployment) -> Option<Shedding> {
    if md.spec.priority == crate::resources::Priority::Essential {
        return None;
    }
    let ann = md.annotations();
    let to = ann
        .get(SHED_TO_ANNOTATION)
        .and_then(|v| v.trim().parse::<i32>().ok())?;
    let min = md
        .spec
        .autoscaling
        .as_ref()
        .map_or(0, |a| a.min_replicas)
        .max(0);
    let budget = ann
        .get(SHED_BY_ANNOTATION)
        .cloned()
        .unwrap_or_else(|| "an EnergyBudget".into());
    Some(Shedding {
        budget,
        replicas: min.max(to),
    })
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
    /// `runtimeClassName` of the inference Pods: `nvidia` where the NVIDIA
    /// container runtime is a RuntimeClass (k3s, the GPU Operator) and not
    /// the default; `None` leaves the cluster's default runtime.
    pub runtime_class: Option<String>,
    /// Secrets (in each ModelDeployment's own namespace) the kubelet pulls
    /// the engine images with, for a private registry.
    pub image_pull_secrets: Vec<String>,
    /// The node model cache of `huggingFace` sources.
    pub model_cache: crate::serving::model_cache::ModelCacheVolume,
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
            runtime_class: None,
            image_pull_secrets: Vec::new(),
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

/// The Deployment serving `md`. Built from k8s-openapi's typed structs: a
/// misspelt field is a compile error, not a field the API server never
/// sees (`None` fields are left out, so only what 1.20 knows is sent).
pub fn deployment(
    md: &ModelDeployment,
    placement: &PlacementForWorkload,
    defaults: &EngineDefaults,
) -> Result<Deployment, WorkloadError> {
    let owner = md.controller_owner_ref(&()).ok_or(WorkloadError::NoUid)?;
    let name = md.name_any();
    let model = model_mount(md, defaults)?;
    // The admin token: a read-only Secret volume, for copyhold-node only
    // (vLLM has no such endpoint). Not optional: a node started without
    // its token file would exit, so the Pod waits for the Secret instead
    // (kubelet reports `FailedMount` naming it).
    let admin_secret = match md.spec.engine.kind {
        EngineKind::Copyhold => defaults.admin_token_secret.as_deref(),
        EngineKind::Vllm => None,
    };
    let model_dir = model.model_dir.clone();
    let (mounts, mut volumes) = mounts_and_volumes(model, admin_secret);
    let container = engine_container(
        md,
        placement.gpus_per_replica,
        defaults,
        admin_secret,
        mounts,
        &model_dir,
    );
    let init_containers = fetch_containers(md, defaults, &mut volumes);
    let labels = labels(md);
    Ok(Deployment {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: md.namespace(),
            labels: Some(labels.clone()),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(DeploymentSpec {
            replicas: Some(placement.replicas),
            revision_history_limit: Some(3),
            selector: LabelSelector {
                match_labels: Some(selector_labels(&name)),
                ..Default::default()
            },
            // GPUs are scarce: replace a replica in place rather than surge.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(0)),
                    max_unavailable: Some(IntOrString::Int(1)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    init_containers: (!init_containers.is_empty()).then_some(init_containers),
                    ..pod_spec(placement, defaults, container, volumes)
                }),
            },
            ..Default::default()
        }),
        status: None,
    })
}

/// Where the model is read from: the volume, the sub-path and place it is
/// mounted at, and the directory the engine loads.
struct ModelMount {
    volume: Volume,
    sub_path: Option<String>,
    mount_path: &'static str,
    model_dir: String,
}

/// The volume the model is read from: the engine reads the model where it
/// lies (hostPath or a PVC), or from the node model cache a fetch init
/// container fills (huggingFace).
fn model_mount(
    md: &ModelDeployment,
    defaults: &EngineDefaults,
) -> Result<ModelMount, WorkloadError> {
    let src = &md.spec.model.source;
    let name = "model".to_string();
    let at_models = |volume: Volume, sub_path: Option<String>| ModelMount {
        volume,
        sub_path,
        mount_path: MODEL_DIR,
        model_dir: MODEL_DIR.into(),
    };
    if let Some(cached) = model_cache::Cached::of(src) {
        Ok(ModelMount {
            volume: model_cache::volume(&defaults.model_cache),
            sub_path: None,
            mount_path: model_cache::MODEL_CACHE_DIR,
            model_dir: cached.model_path(),
        })
    } else if let Some(h) = &src.host_path {
        let v = Volume {
            name,
            host_path: Some(HostPathVolumeSource {
                path: h.path.clone(),
                type_: Some("Directory".into()),
            }),
            ..Default::default()
        };
        Ok(at_models(v, None))
    } else if let Some(p) = &src.pvc {
        let v = Volume {
            name,
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: p.claim_name.clone(),
                read_only: Some(true),
            }),
            ..Default::default()
        };
        Ok(at_models(v, p.sub_path.clone()))
    } else if src.oci.is_some() {
        Err(WorkloadError::UnsupportedSource("oci"))
    } else {
        Err(WorkloadError::NoSource)
    }
}

/// The fetch init container of a huggingFace or http source (and its
/// token's volume); none for sources the engine reads in place.
fn fetch_containers(
    md: &ModelDeployment,
    defaults: &EngineDefaults,
    volumes: &mut Vec<Volume>,
) -> Vec<Container> {
    let Some(src) = model_cache::Cached::of(&md.spec.model.source) else {
        return Vec::new();
    };
    volumes.extend(model_cache::token_volume(src));
    if defaults.model_cache_max_bytes.is_some() {
        volumes.push(model_cache::in_use_volume());
    }
    vec![model_cache::fetch_container(
        src,
        &defaults.copyhold_image,
        defaults.model_cache_max_bytes,
        locked_down(),
    )]
}

/// No privilege escalation, read-only root filesystem, no capabilities,
/// not root: every container of the Pod.
pub fn locked_down() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        ..Default::default()
    }
}

/// The container's mounts and the Pod's volumes: the model read-only,
/// writable `/tmp` and cache (the root filesystem is read-only), and the
/// admin token when there is one.
fn mounts_and_volumes(
    model: ModelMount,
    admin_secret: Option<&str>,
) -> (Vec<VolumeMount>, Vec<Volume>) {
    let mount = |name: &str, path: &str, read_only: Option<bool>| VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only,
        ..Default::default()
    };
    let empty_dir = |name: &str| Volume {
        name: name.into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    };
    let mut mounts = vec![
        VolumeMount {
            sub_path: model.sub_path,
            ..mount("model", model.mount_path, Some(true))
        },
        mount("tmp", "/tmp", None),
        mount("cache", "/var/cache/copyhold", None),
    ];
    let mut volumes = vec![model.volume, empty_dir("tmp"), empty_dir("cache")];
    if let Some(secret) = admin_secret {
        mounts.push(mount("admin-token", ADMIN_TOKEN_DIR, Some(true)));
        // 0400; the kubelet adds group read for the Pod's fsGroup, which is
        // how the engine's non-root user reads it.
        volumes.push(Volume {
            name: "admin-token".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.into()),
                default_mode: Some(0o400),
                items: Some(vec![KeyToPath {
                    key: ADMIN_TOKEN_KEY.into(),
                    path: ADMIN_TOKEN_KEY.into(),
                    mode: None,
                }]),
                optional: None,
            }),
            ..Default::default()
        });
    }
    (mounts, volumes)
}

/// Image, command and arguments of the engine `md` names.
fn engine_command(
    md: &ModelDeployment,
    gpus: u32,
    defaults: &EngineDefaults,
    model_dir: &str,
) -> (String, Vec<String>, Vec<String>) {
    let serving = &md.spec.serving;
    let served = served_model_name(md);
    let image = |default: &String| {
        md.spec
            .engine
            .image
            .clone()
            .unwrap_or_else(|| default.clone())
    };
    let strings = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let port = ENGINE_PORT.to_string();
    match md.spec.engine.kind {
        EngineKind::Copyhold => (
            image(&defaults.copyhold_image),
            strings(&["copyhold-node"]),
            [
                strings(&[
                    "serve",
                    "--model",
                    model_dir,
                    "--host",
                    "0.0.0.0",
                    "--port",
                    &port,
                    "--served-model-name",
                    &served,
                    "--device",
                    &defaults.node_device,
                ]),
                node_sizing_args(serving),
            ]
            .concat(),
        ),
        EngineKind::Vllm => (
            image(&defaults.vllm_image),
            strings(&["vllm"]),
            strings(&[
                "serve",
                model_dir,
                "--host",
                "0.0.0.0",
                "--port",
                &port,
                "--served-model-name",
                &served,
                "--max-model-len",
                &serving.context_length.to_string(),
                "--max-num-seqs",
                &serving.max_concurrent_sequences.to_string(),
                "--gpu-memory-utilization",
                &serving.gpu_memory_utilization.to_string(),
                // Layers split across the node's GPUs, as our own engine does.
                "--pipeline-parallel-size",
                &gpus.to_string(),
            ]),
        ),
    }
}

/// What placement sized, for `copyhold-node`: the context, the sequences
/// it runs at once and the share of each GPU it may use, so its KV pool
/// holds `contextLength × maxConcurrentSequences` tokens; with
/// `kvCacheMemory`, that budget in MiB instead.
fn node_sizing_args(serving: &ServingSpec) -> Vec<String> {
    let mut args = vec![
        "--max-model-len".to_string(),
        serving.context_length.to_string(),
        "--max-running".to_string(),
        serving.max_concurrent_sequences.to_string(),
        "--gpu-memory-utilization".to_string(),
        serving.gpu_memory_utilization.to_string(),
    ];
    // A malformed quantity never gets here: sizing refuses it first.
    if let Some(bytes) = serving
        .kv_cache_memory
        .as_ref()
        .and_then(|q| quantity::bytes(&q.0).ok())
    {
        args.push("--kv-cache-mib".into());
        args.push((bytes >> 20).max(1).to_string());
    }
    args
}

/// The user's requests and limits, with the GPUs placement gave.
fn resources(md: &ModelDeployment, gpus: u32) -> ResourceRequirements {
    let mut limits = BTreeMap::new();
    let mut requests = BTreeMap::new();
    if let Some(r) = &md.spec.serving.resources {
        limits.extend(
            r.limits
                .iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        requests.extend(
            r.requests
                .iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
    }
    if gpus > 0 {
        limits.insert("nvidia.com/gpu".into(), Quantity(gpus.to_string()));
    }
    ResourceRequirements {
        limits: Some(limits),
        requests: (!requests.is_empty()).then_some(requests),
        ..Default::default()
    }
}

/// An HTTP probe of the engine's `/health`.
fn health_probe(period_seconds: i32, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some("/health".into()),
            port: IntOrString::String("http".into()),
            ..Default::default()
        }),
        period_seconds: Some(period_seconds),
        failure_threshold: Some(failure_threshold),
        ..Default::default()
    }
}

/// The engine container, locked down: no privilege escalation, read-only
/// root filesystem, no capabilities, not root.
fn engine_container(
    md: &ModelDeployment,
    gpus: u32,
    defaults: &EngineDefaults,
    admin_secret: Option<&str>,
    mounts: Vec<VolumeMount>,
    model_dir: &str,
) -> Container {
    let (image, command, mut args) = engine_command(md, gpus, defaults, model_dir);
    if admin_secret.is_some() {
        args.push("--admin-token-file".into());
        args.push(format!("{ADMIN_TOKEN_DIR}/{ADMIN_TOKEN_KEY}"));
    }
    args.extend(md.spec.engine.args.iter().cloned());
    let env = md
        .spec
        .engine
        .env
        .iter()
        .map(|(k, v)| EnvVar {
            name: k.clone(),
            value: Some(v.clone()),
            value_from: None,
        })
        .collect();
    Container {
        name: "engine".into(),
        image: Some(image),
        command: Some(command),
        args: Some(args),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: ENGINE_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        resources: Some(resources(md, gpus)),
        volume_mounts: Some(mounts),
        startup_probe: Some(health_probe(5, 360)),
        readiness_probe: Some(health_probe(5, 2)),
        liveness_probe: Some(health_probe(10, 6)),
        security_context: Some(locked_down()),
        ..Default::default()
    }
}

/// The Pod: no service-account token, no service links, a fixed non-root
/// user with the runtime's seccomp profile, on the placed nodes' GPUs, with
/// the runtime class and pull secrets the controller was given.
fn pod_spec(
    placement: &PlacementForWorkload,
    defaults: &EngineDefaults,
    container: Container,
    volumes: Vec<Volume>,
) -> PodSpec {
    let pull_secrets: Vec<LocalObjectReference> = defaults
        .image_pull_secrets
        .iter()
        .map(|name| LocalObjectReference { name: name.clone() })
        .collect();
    PodSpec {
        runtime_class_name: defaults.runtime_class.clone(),
        image_pull_secrets: (!pull_secrets.is_empty()).then_some(pull_secrets),
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        termination_grace_period_seconds: Some(30),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(65532),
            run_as_group: Some(65532),
            fs_group: Some(65532),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..Default::default()
        }),
        affinity: Some(placement.affinity.clone()),
        // Placement leaves out nodes with taints these do not tolerate.
        tolerations: Some(super::placement::engine_tolerations()),
        containers: vec![container],
        volumes: Some(volumes),
        ..Default::default()
    }
}

/// The Service in front of `md`'s replicas.
pub fn service(md: &ModelDeployment) -> Result<Service, WorkloadError> {
    let owner = md.controller_owner_ref(&()).ok_or(WorkloadError::NoUid)?;
    let name = md.name_any();
    Ok(Service {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: md.namespace(),
            labels: Some(labels(md)),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector_labels(&name)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(yaml: &str) -> ModelDeployment {
        let mut md: ModelDeployment = serde_saphyr::from_str(yaml).expect("valid test manifest");
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

    /// Every hardening field the Deployment promises.
    fn assert_hardened(d: &Deployment) {
        let pod = d
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .expect("pod");
        assert_eq!(pod.automount_service_account_token, Some(false));
        assert_eq!(pod.enable_service_links, Some(false));
        let psc = pod.security_context.as_ref().expect("pod security context");
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(
            (psc.run_as_user, psc.run_as_group, psc.fs_group),
            (Some(65532), Some(65532), Some(65532))
        );
        assert_eq!(
            psc.seccomp_profile.as_ref().map(|p| p.type_.as_str()),
            Some("RuntimeDefault")
        );
        let c = &pod.containers[0];
        let sc = c
            .security_context
            .as_ref()
            .expect("container security context");
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.run_as_non_root, Some(true));
        for p in [&c.startup_probe, &c.readiness_probe, &c.liveness_probe] {
            let p = p.as_ref().expect("probe");
            assert_eq!(
                p.http_get.as_ref().and_then(|h| h.path.as_deref()),
                Some("/health")
            );
        }
    }

    #[test]
    fn the_pod_is_hardened_in_every_field_it_promises() {
        for m in [
            md(BASIC),
            md(&BASIC.replace("replicas: 2", "replicas: 2\n  engine: {kind: vllm}")),
        ] {
            assert_hardened(
                &deployment(&m, &placed(1), &EngineDefaults::default()).expect("builds"),
            );
        }
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

    /// The engine's argument after `flag`.
    fn arg_after(d: &Deployment, flag: &str) -> Option<String> {
        let args = d
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|p| p.containers[0].args.clone())
            .unwrap_or_default();
        let at = args.iter().position(|a| a == flag)?;
        args.get(at + 1).cloned()
    }

    #[test]
    fn the_node_gets_the_context_sequences_and_memory_share_placement_sized() {
        let m = md(&BASIC.replace(
            "replicas: 2",
            "replicas: 2\n  serving: {contextLength: 2048, maxConcurrentSequences: 3, gpuMemoryUtilization: 0.8}",
        ));
        let d = deployment(&m, &placed(1), &EngineDefaults::default()).expect("builds");
        assert_eq!(arg_after(&d, "--max-model-len").as_deref(), Some("2048"));
        assert_eq!(arg_after(&d, "--max-running").as_deref(), Some("3"));
        assert_eq!(
            arg_after(&d, "--gpu-memory-utilization").as_deref(),
            Some("0.8")
        );
        assert_eq!(arg_after(&d, "--kv-cache-mib"), None, "sized by the node");
        let m = md(&BASIC.replace(
            "replicas: 2",
            "replicas: 2\n  serving: {kvCacheMemory: 1536Mi}",
        ));
        let d = deployment(&m, &placed(1), &EngineDefaults::default()).expect("builds");
        assert_eq!(arg_after(&d, "--kv-cache-mib").as_deref(), Some("1536"));
        assert_eq!(arg_after(&d, "--max-model-len").as_deref(), Some("4096"));
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
    fn the_runtime_class_and_pull_secrets_given_to_the_controller_go_into_the_inference_pods() {
        let defaults = EngineDefaults {
            runtime_class: Some("nvidia".into()),
            image_pull_secrets: vec!["registry-a".into(), "registry-b".into()],
            ..Default::default()
        };
        let d = deployment(&md(BASIC), &placed(1), &defaults).expect("builds");
        let pod = d.spec.and_then(|s| s.template.spec).expect("pod");
        assert_eq!(pod.runtime_class_name.as_deref(), Some("nvidia"));
        let secrets: Vec<String> = pod
            .image_pull_secrets
            .unwrap_or_default()
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(secrets, vec!["registry-a", "registry-b"]);
        // Unset: the cluster's default runtime, no pull secrets.
        let plain = deployment(&md(BASIC), &placed(1), &EngineDefaults::default()).expect("builds");
        let pod = plain.spec.and_then(|s| s.template.spec).expect("pod");
        assert_eq!(pod.runtime_class_name, None);
        assert_eq!(pod.image_pull_secrets, None);
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
    fn http_sources_are_fetched_from_the_mirror_into_the_cache_before_the_engine_serves_them() {
        let m = md(&BASIC.replace(
            "{hostPath: {path: /srv/models/tiny}}",
            "{http: {url: 'http://models.local/tiny'}}",
        ));
        let d = deployment(&m, &placed(1), &EngineDefaults::default()).expect("builds");
        let pod = d.spec.and_then(|s| s.template.spec).expect("pod");
        let init = pod.init_containers.clone().unwrap_or_default();
        let fetch = init[0].args.clone().unwrap_or_default().join(" ");
        assert!(
            fetch.starts_with("fetch --mirror http://models.local/tiny"),
            "{fetch}"
        );
        let engine = pod.containers[0].args.clone().unwrap_or_default().join(" ");
        assert!(
            engine
                .contains("--model /var/cache/copyhold-models/models/mirror--models.local--tiny-"),
            "{engine}"
        );
    }

    #[test]
    fn oci_sources_are_refused_with_a_reason() {
        let m = md(&BASIC.replace(
            "{hostPath: {path: /srv/models/tiny}}",
            "{oci: {reference: 'registry.local/models/tiny:1'}}",
        ));
        assert_eq!(
            deployment(&m, &placed(1), &EngineDefaults::default()).err(),
            Some(WorkloadError::UnsupportedSource("oci"))
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
            model_cache: crate::serving::model_cache::ModelCacheVolume::HostPath(
                "/srv/cache".into(),
            ),
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
