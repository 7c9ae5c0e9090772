//! The node model cache of `huggingFace` sources, as the Deployment sees it:
//! the cache volume (a hostPath directory on each node, or one
//! ReadWriteMany claim shared by all), the init container that fetches the
//! model into it (`copyhold-node fetch`), and the path the engine loads.
//!
//! The cache is content-addressed (copyhold_hub::cache): two
//! ModelDeployments of one model on one node (or on one shared claim)
//! download it once; the second init container finds the verified blobs and
//! only links them.

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, HostPathVolumeSource, KeyToPath, PersistentVolumeClaimVolumeSource,
    SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};

use crate::resources::HuggingFaceSource;

/// Where the cache is mounted in the Pod.
pub const MODEL_CACHE_DIR: &str = "/var/cache/copyhold-models";
/// Where a source's token Secret is mounted for the fetcher.
pub const HF_TOKEN_DIR: &str = "/var/run/copyhold/hf";
/// Port the fetcher serves its progress on (the engine's, free until the
/// engine starts after it).
pub const FETCH_PROGRESS_PORT: i32 = super::workload::ENGINE_PORT;

/// The cache volume's kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelCacheVolume {
    /// A directory on each node (created when missing; it must be writable
    /// by the Pods' user, 65532).
    HostPath(String),
    /// A ReadWriteMany PersistentVolumeClaim of this name, in each
    /// ModelDeployment's namespace.
    Pvc(String),
}

impl Default for ModelCacheVolume {
    fn default() -> Self {
        ModelCacheVolume::HostPath("/var/lib/copyhold/models".into())
    }
}

/// The `volumes` entry of the cache.
pub fn volume(cache: &ModelCacheVolume) -> Volume {
    let name = "model".to_string();
    match cache {
        ModelCacheVolume::HostPath(p) => Volume {
            name,
            host_path: Some(HostPathVolumeSource {
                path: p.clone(),
                type_: Some("DirectoryOrCreate".into()),
            }),
            ..Default::default()
        },
        ModelCacheVolume::Pvc(c) => Volume {
            name,
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: c.clone(),
                read_only: None,
            }),
            ..Default::default()
        },
    }
}

/// The directory the engine loads: the revision's snapshot in the cache.
pub fn model_path(hf: &HuggingFaceSource) -> String {
    format!(
        "{MODEL_CACHE_DIR}/models/{}/revisions/{}",
        hf.repo.replace('/', "--"),
        hf.revision
    )
}

/// The token Secret's volume, when the source names one.
pub fn token_volume(hf: &HuggingFaceSource) -> Option<Volume> {
    hf.token_secret.as_ref().map(|s| Volume {
        name: "hf-token".into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(s.clone()),
            default_mode: Some(0o400),
            items: Some(vec![KeyToPath {
                key: "token".into(),
                path: "token".into(),
                mode: None,
            }]),
            optional: None,
        }),
        ..Default::default()
    })
}

/// The fetcher's arguments: the repository, the hub, the cache, and the
/// optional file filter, cache bound and token.
fn fetch_args(hf: &HuggingFaceSource, max_cache_bytes: Option<u64>) -> Vec<String> {
    let mut args = vec![
        "fetch".to_string(),
        "--repo".into(),
        hf.repo.clone(),
        "--revision".into(),
        hf.revision.clone(),
        "--endpoint".into(),
        hf.endpoint(),
        "--cache".into(),
        MODEL_CACHE_DIR.into(),
        "--progress-addr".into(),
        format!("0.0.0.0:{FETCH_PROGRESS_PORT}"),
    ];
    for f in &hf.files {
        args.push("--file".into());
        args.push(f.clone());
    }
    if let Some(b) = max_cache_bytes {
        args.push("--max-cache-bytes".into());
        args.push(b.to_string());
    }
    if hf.token_secret.is_some() {
        args.push("--token-file".into());
        args.push(format!("{HF_TOKEN_DIR}/token"));
    }
    args
}

/// The init container fetching the model into the cache.
pub fn fetch_container(
    hf: &HuggingFaceSource,
    image: &str,
    max_cache_bytes: Option<u64>,
    security: SecurityContext,
) -> Container {
    let mut mounts = vec![VolumeMount {
        name: "model".into(),
        mount_path: MODEL_CACHE_DIR.into(),
        ..Default::default()
    }];
    if hf.token_secret.is_some() {
        mounts.push(VolumeMount {
            name: "hf-token".into(),
            mount_path: HF_TOKEN_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        });
    }
    Container {
        name: "fetch".into(),
        image: Some(image.into()),
        command: Some(vec!["copyhold-node".into()]),
        args: Some(fetch_args(hf, max_cache_bytes)),
        ports: Some(vec![ContainerPort {
            name: Some("progress".into()),
            container_port: FETCH_PROGRESS_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        volume_mounts: Some(mounts),
        // The error (401, 404, a corrupt download) as the container's
        // termination message, for the controller's condition.
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        security_context: Some(security),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn hf() -> HuggingFaceSource {
        serde_json::from_value(json!({"repo": "town/tiny-llama", "tokenSecret": "hf"})).unwrap()
    }

    #[test]
    fn the_engine_loads_the_revision_in_the_cache() {
        assert_eq!(
            model_path(&hf()),
            "/var/cache/copyhold-models/models/town--tiny-llama/revisions/main"
        );
    }

    #[test]
    fn the_fetcher_gets_the_repo_the_hub_the_cache_and_the_token_file() {
        let c = fetch_container(&hf(), "img", Some(1 << 30), SecurityContext::default());
        let line = c.args.clone().unwrap_or_default().join(" ");
        assert!(
            line.starts_with("fetch --repo town/tiny-llama --revision main --endpoint https://huggingface.co --cache /var/cache/copyhold-models"),
            "{line}"
        );
        assert!(
            line.contains("--token-file /var/run/copyhold/hf/token"),
            "{line}"
        );
        assert!(line.contains("--max-cache-bytes 1073741824"), "{line}");
        assert_eq!(c.volume_mounts.unwrap_or_default()[1].name, "hf-token");
    }
}
