//! The node model cache of `huggingFace` sources, as the Deployment sees it:
//! the cache volume (a hostPath directory on each node, or one
//! ReadWriteMany claim shared by all), the init container that fetches the
//! model into it (`copyhold-node fetch`), and the path the engine loads.
//!
//! Two kinds of source are fetched into it: a `huggingFace` repository
//! (the Hub's protocol) and an `http` mirror (a plain web server serving the
//! model's directory with a `SHA256SUMS` manifest); [`Cached`] is what the
//! Deployment and the controller need of either.
//!
//! The cache is content-addressed (copyhold_hub::cache): two
//! ModelDeployments of one model on one node (or on one shared claim)
//! download it once; the second init container finds the verified blobs and
//! only links them.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, Container, ContainerPort, HostPathVolumeSource, KeyToPath,
    PersistentVolumeClaimVolumeSource, SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use kube::ResourceExt as _;

use crate::resources::{HttpSource, HuggingFaceSource, ModelDeployment, ModelSource};

/// Where the cache is mounted in the Pod.
pub const MODEL_CACHE_DIR: &str = "/var/cache/copyhold-models";
/// Where a source's token Secret is mounted for the fetcher.
pub const HF_TOKEN_DIR: &str = "/var/run/copyhold/hf";
/// The ConfigMap (in each namespace with a fetched model) naming every
/// model the ModelDeployments use, one `OWNER/NAME` a line under
/// [`IN_USE_KEY`]: the fetcher, which has no API credentials, evicts only
/// models it does not name.
pub const IN_USE_CONFIGMAP: &str = "copyhold-models-in-use";
/// The ConfigMap's key, and the file's name where it is mounted.
pub const IN_USE_KEY: &str = "models";
/// Where the fetcher finds the ConfigMap.
pub const IN_USE_DIR: &str = "/etc/copyhold/models-in-use";
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

/// A source that is fetched into the cache before the engine starts.
#[derive(Clone, Copy, Debug)]
pub enum Cached<'a> {
    Hub(&'a HuggingFaceSource),
    Mirror(&'a HttpSource),
}

impl<'a> Cached<'a> {
    /// The cached source `src` names, if any (hostPath and PVC sources are
    /// read in place).
    pub fn of(src: &'a ModelSource) -> Option<Self> {
        match (&src.hugging_face, &src.http) {
            (Some(hf), _) => Some(Cached::Hub(hf)),
            (None, Some(h)) => Some(Cached::Mirror(h)),
            _ => None,
        }
    }

    /// The model's name in the cache (`OWNER/NAME`) and its revision.
    fn key(&self) -> (String, String) {
        match self {
            Cached::Hub(hf) => (hf.repo.clone(), hf.revision.clone()),
            Cached::Mirror(h) => (copyhold_hub::fetch::mirror_repo_id(&h.url), "main".into()),
        }
    }

    /// The model's name in the cache, `OWNER/NAME` (a mirror's is made from
    /// its URL): what the in-use file names.
    pub fn cache_name(&self) -> String {
        self.key().0
    }

    /// The directory the engine loads: the revision's snapshot in the cache.
    pub fn model_path(&self) -> String {
        let (repo, revision) = self.key();
        format!(
            "{MODEL_CACHE_DIR}/models/{}/revisions/{revision}",
            repo.replace('/', "--")
        )
    }

    /// What is fetched, for messages and Events.
    pub fn describe(&self) -> String {
        match self {
            Cached::Hub(hf) => format!("{}@{} from {}", hf.repo, hf.revision, hf.endpoint()),
            Cached::Mirror(h) => format!("the mirror {}", h.url.trim_end_matches('/')),
        }
    }

    fn token_secret(&self) -> Option<&'a String> {
        match self {
            Cached::Hub(hf) => hf.token_secret.as_ref(),
            Cached::Mirror(_) => None,
        }
    }
}

/// The directory the engine loads: the revision's snapshot in the cache.
pub fn model_path(hf: &HuggingFaceSource) -> String {
    Cached::Hub(hf).model_path()
}

/// The token Secret's volume, when the source names one.
pub fn token_volume(src: Cached) -> Option<Volume> {
    src.token_secret().map(|s| Volume {
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

/// The in-use ConfigMap's volume, optional: a Pod that starts before the
/// controller wrote it fetches without evicting (the fetcher treats a
/// missing file as "in use unknown").
pub fn in_use_volume() -> Volume {
    Volume {
        name: "models-in-use".into(),
        config_map: Some(ConfigMapVolumeSource {
            name: IN_USE_CONFIGMAP.into(),
            optional: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The in-use file's text for each namespace that has a ModelDeployment of
/// a fetched model: every such model of every ModelDeployment in `mds`
/// (the cache is shared across namespaces on a node), sorted, once each.
pub fn in_use_by_namespace<'a>(
    mds: impl IntoIterator<Item = &'a ModelDeployment>,
) -> BTreeMap<String, String> {
    let mut models = BTreeSet::new();
    let mut namespaces = BTreeSet::new();
    for md in mds {
        if let Some(src) = Cached::of(&md.spec.model.source) {
            models.insert(src.cache_name());
            namespaces.extend(md.namespace());
        }
    }
    let text: String = models.iter().map(|m| format!("{m}\n")).collect();
    namespaces
        .into_iter()
        .map(|ns| (ns, text.clone()))
        .collect()
}

/// The fetcher's arguments: the repository, the hub, the cache, and the
/// optional file filter, cache bound (with the in-use file) and token.
fn fetch_args(src: Cached, max_cache_bytes: Option<u64>) -> Vec<String> {
    let mut args = vec!["fetch".to_string()];
    match src {
        Cached::Hub(hf) => {
            args.extend([
                "--repo".into(),
                hf.repo.clone(),
                "--revision".into(),
                hf.revision.clone(),
                "--endpoint".into(),
                hf.endpoint(),
            ]);
            for f in &hf.files {
                args.push("--file".into());
                args.push(f.clone());
            }
        }
        Cached::Mirror(h) => args.extend(["--mirror".into(), h.url.clone()]),
    }
    args.extend([
        "--cache".into(),
        MODEL_CACHE_DIR.into(),
        "--progress-addr".into(),
        format!("0.0.0.0:{FETCH_PROGRESS_PORT}"),
    ]);
    if let Some(b) = max_cache_bytes {
        args.push("--max-cache-bytes".into());
        args.push(b.to_string());
        args.push("--in-use-file".into());
        args.push(format!("{IN_USE_DIR}/{IN_USE_KEY}"));
    }
    if src.token_secret().is_some() {
        args.push("--token-file".into());
        args.push(format!("{HF_TOKEN_DIR}/token"));
    }
    args
}

/// The init container fetching the model into the cache.
pub fn fetch_container(
    src: Cached,
    image: &str,
    max_cache_bytes: Option<u64>,
    security: SecurityContext,
) -> Container {
    let mut mounts = vec![VolumeMount {
        name: "model".into(),
        mount_path: MODEL_CACHE_DIR.into(),
        ..Default::default()
    }];
    if src.token_secret().is_some() {
        mounts.push(VolumeMount {
            name: "hf-token".into(),
            mount_path: HF_TOKEN_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        });
    }
    if max_cache_bytes.is_some() {
        mounts.push(VolumeMount {
            name: "models-in-use".into(),
            mount_path: IN_USE_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        });
    }
    Container {
        name: "fetch".into(),
        image: Some(image.into()),
        command: Some(vec!["copyhold-node".into()]),
        args: Some(fetch_args(src, max_cache_bytes)),
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
        let hf = hf();
        let c = fetch_container(
            Cached::Hub(&hf),
            "img",
            Some(1 << 30),
            SecurityContext::default(),
        );
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
        assert!(
            line.contains("--in-use-file /etc/copyhold/models-in-use/models"),
            "{line}"
        );
        let mounts = c.volume_mounts.unwrap_or_default();
        assert_eq!(mounts[1].name, "hf-token");
        assert_eq!(mounts[2].name, "models-in-use");
        assert_eq!(mounts[2].mount_path, IN_USE_DIR);
    }

    #[test]
    fn without_a_cache_bound_nothing_is_evicted_and_no_in_use_file_is_needed() {
        let hf = hf();
        let c = fetch_container(Cached::Hub(&hf), "img", None, SecurityContext::default());
        let line = c.args.clone().unwrap_or_default().join(" ");
        assert!(!line.contains("--in-use-file"), "{line}");
        assert!(!line.contains("--max-cache-bytes"), "{line}");
    }

    fn md(ns: &str, name: &str, source: serde_json::Value) -> ModelDeployment {
        serde_json::from_value(json!({
            "apiVersion": "copyhold.dev/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"model": {"name": name, "source": source}},
        }))
        .unwrap()
    }

    #[test]
    fn every_namespace_with_a_fetched_model_gets_every_fetched_model_of_the_cluster() {
        let mds = [
            md("a", "x", json!({"huggingFace": {"repo": "town/x"}})),
            md(
                "a",
                "x2",
                json!({"huggingFace": {"repo": "town/x", "revision": "v2"}}),
            ),
            md("b", "y", json!({"http": {"url": "http://m.town/y/"}})),
            md("c", "z", json!({"hostPath": {"path": "/models/z"}})),
        ];
        let got = in_use_by_namespace(&mds);
        let mirror = copyhold_hub::fetch::mirror_repo_id("http://m.town/y/");
        let mut want_lines = ["town/x".to_string(), mirror];
        want_lines.sort();
        let want: String = want_lines.iter().map(|l| format!("{l}\n")).collect();
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            ["a", "b"],
            "c reads in place"
        );
        assert_eq!(got["a"], want);
        assert_eq!(got["b"], want, "the node cache is shared across namespaces");
    }

    #[test]
    fn an_http_mirror_is_fetched_into_a_cache_entry_of_its_own_with_its_manifest() {
        let h: HttpSource =
            serde_json::from_value(json!({"url": "http://mirror.town:8080/qwen/"})).unwrap();
        let c = fetch_container(Cached::Mirror(&h), "img", None, SecurityContext::default());
        let line = c.args.clone().unwrap_or_default().join(" ");
        assert!(
            line.starts_with(
                "fetch --mirror http://mirror.town:8080/qwen/ --cache /var/cache/copyhold-models"
            ),
            "{line}"
        );
        assert!(
            !line.contains("--repo") && !line.contains("--token-file"),
            "{line}"
        );
        let path = Cached::Mirror(&h).model_path();
        assert!(
            path.starts_with("/var/cache/copyhold-models/models/mirror--mirror.town-8080--qwen-")
                && path.ends_with("/revisions/main"),
            "{path}"
        );
    }
}
