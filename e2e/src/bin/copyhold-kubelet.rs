//! A stand-in for the kubelet, for tests and the demo only.
//!
//! Watches Pods bound to the simulated nodes, runs each Pod's init
//! containers in order (each to a successful exit, retried after a failure,
//! their state reported in `initContainerStatuses`; a failure's message is
//! the tail of its log, as `FallbackToLogsOnError` gives), then its first
//! container as a local process (images mapped to freshly built binaries), gives every
//! Pod its own loopback address as its Pod IP, reports readiness from the
//! container's readiness probe, restarts crashed processes, and stops them
//! (and removes the Pod, as a kubelet confirms deletion) when Pods go away.
//!
//! Like a kubelet it gives a Pod its environment (values and the downward
//! API's `fieldRef`s) and its ServiceAccount's credentials: a token from the
//! TokenRequest API, bound to the Pod, handed over as a kubeconfig in
//! `KUBECONFIG` (a local process cannot see the in-cluster token path), so a
//! controller or gateway Pod acts with exactly the RBAC its chart gave it.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Container, KeyToPath, Pod, ServiceAccount, Volume};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

/// A Secret's or ConfigMap's keys, for a volume of it.
struct DataVolume {
    /// "secret" or "configmap", for messages.
    kind: &'static str,
    name: String,
    data: BTreeMap<String, Vec<u8>>,
    items: Option<Vec<KeyToPath>>,
    optional: bool,
}

#[derive(Parser, Debug)]
#[command(about = "Runs Pods bound to simulated nodes as local processes (tests only)")]
struct Args {
    /// Nodes this stand-in plays the kubelet for (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "gpu-p100,gpu-p40,gpu-v100,gpu-t4,gpu-p4,cpu-only"
    )]
    nodes: Vec<String>,
    /// `IMAGE_PREFIX=BINARY`: a container whose image starts with the prefix
    /// runs BINARY in place of its command's first word. Repeatable.
    #[arg(long = "image", value_parser = parse_mapping)]
    images: Vec<(String, PathBuf)>,
    /// First octet pair of Pod IPs: Pods get 127.<a>.<b>.<n>.
    #[arg(long, default_value = "127.0.100")]
    ip_prefix: String,
    /// Only Pods of these namespaces (comma-separated; all when absent).
    #[arg(long, value_delimiter = ',')]
    namespace: Vec<String>,
    /// Directory for each Pod's log file.
    #[arg(long, default_value = "/tmp/copyhold-kubelet")]
    log_dir: PathBuf,
}

fn parse_mapping(s: &str) -> Result<(String, PathBuf), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not IMAGE_PREFIX=BINARY"))?;
    Ok((k.to_owned(), PathBuf::from(v)))
}

struct Running {
    child: Child,
    ip: Ipv4Addr,
    restarts: i32,
}

struct Kubelet {
    args: Args,
    client: Client,
    /// The API server as this stand-in reaches it, for the Pods' kubeconfigs.
    cluster: kube::config::Cluster,
    running: Mutex<HashMap<String, Running>>,
    /// Pods whose init containers run: the running one's process id.
    initializing: Mutex<HashMap<String, Option<u32>>>,
    /// Each Pod's `initContainerStatuses`, as last reported.
    init_statuses: Mutex<HashMap<String, serde_json::Value>>,
    next_ip: Mutex<u8>,
}

/// The container's environment: literal values and the downward API's
/// fields, as a kubelet resolves them.
fn container_env(pod: &Pod, c: &Container, ip: Ipv4Addr) -> Vec<(String, String)> {
    let spec = pod.spec.as_ref();
    let field = |path: &str| -> Option<String> {
        match path {
            "metadata.name" => Some(pod.name_any()),
            "metadata.namespace" => pod.namespace(),
            "metadata.uid" => pod.metadata.uid.clone(),
            "spec.nodeName" => spec.and_then(|s| s.node_name.clone()),
            "spec.serviceAccountName" => spec.and_then(|s| s.service_account_name.clone()),
            "status.podIP" | "status.hostIP" => Some(ip.to_string()),
            _ => {
                let label = path
                    .strip_prefix("metadata.labels['")
                    .and_then(|r| r.strip_suffix("']"))?;
                pod.labels().get(label).cloned()
            }
        }
    };
    let mut env = Vec::new();
    for e in c.env.clone().unwrap_or_default() {
        let value = match (e.value, e.value_from) {
            (Some(v), _) => Some(v),
            (None, Some(from)) => from.field_ref.and_then(|f| field(&f.field_path)),
            (None, None) => Some(String::new()),
        };
        match value {
            Some(v) => env.push((e.name, v)),
            None => eprintln!(
                "kubelet: {}: env {} is not resolvable here",
                key(pod),
                e.name
            ),
        }
    }
    env
}

/// Writes a file only its owner may read (tokens).
fn write_private(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes)?;
    Ok(())
}

fn key(p: &Pod) -> String {
    format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any())
}

impl Kubelet {
    async fn ip(&self) -> Result<Ipv4Addr> {
        let mut n = self.next_ip.lock().await;
        *n = n.checked_add(1).filter(|n| *n < 255).unwrap_or(2);
        format!("{}.{}", self.args.ip_prefix, *n)
            .parse()
            .context("bad --ip-prefix")
    }

    /// The command line a container would run, with our binaries in place of
    /// images, the Pod's IP in place of 0.0.0.0, and volume paths resolved.
    fn command_line(&self, pod: &Pod, c: &Container, ip: Ipv4Addr) -> Result<Vec<String>> {
        let image = c.image.clone().unwrap_or_default();
        let binary = self
            .args
            .images
            .iter()
            .find(|(prefix, _)| image.starts_with(prefix.as_str()))
            .map(|(_, b)| b.clone())
            .with_context(|| format!("no --image mapping for `{image}`"))?;
        let mut argv: Vec<String> = c.command.clone().unwrap_or_default();
        argv.extend(c.args.clone().unwrap_or_default());
        if argv.is_empty() {
            argv.push(binary.display().to_string());
        } else {
            argv[0] = binary.display().to_string();
        }
        // Mount paths of hostPath volumes become the host paths themselves.
        let mut mounts: BTreeMap<String, String> = BTreeMap::new();
        let volumes = pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.clone())
            .unwrap_or_default();
        for m in c.volume_mounts.clone().unwrap_or_default() {
            if let Some(hp) = volumes
                .iter()
                .find(|v| v.name == m.name)
                .and_then(|v| v.host_path.as_ref())
            {
                let path = match &m.sub_path {
                    Some(sp) => format!("{}/{sp}", hp.path),
                    None => hp.path.clone(),
                };
                mounts.insert(m.mount_path.clone(), path);
            }
        }
        Ok(argv
            .into_iter()
            .map(|a| {
                // `0.0.0.0` and `0.0.0.0:PORT`, alone or in `--flag=…`: the
                // Pod listens on its own address.
                let a = a.replace("0.0.0.0", &ip.to_string());
                for (mount, host) in &mounts {
                    if a == *mount {
                        return host.clone();
                    }
                    if let Some(rest) = a.strip_prefix(&format!("{mount}/")) {
                        return format!("{host}/{rest}");
                    }
                }
                a
            })
            .collect())
    }

    /// A container's process, logging to `log_path`.
    async fn spawn(
        &self,
        pod: &Pod,
        c: &Container,
        ip: Ipv4Addr,
        log_path: &std::path::Path,
    ) -> Result<Child> {
        let argv = self.command_line(pod, c, ip)?;
        let argv = self.data_volumes(pod, c, argv).await?;
        std::fs::create_dir_all(&self.args.log_dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)?;
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        for (name, value) in container_env(pod, c, ip) {
            cmd.env(name, value);
        }
        if let Some(kubeconfig) = self.credentials(pod).await? {
            cmd.env("KUBECONFIG", kubeconfig);
        }
        let child = cmd.spawn().with_context(|| format!("starting {argv:?}"))?;
        eprintln!(
            "kubelet: started {}/{} as pid {:?} on {ip}: {}",
            key(pod),
            c.name,
            child.id(),
            argv.join(" ")
        );
        Ok(child)
    }

    fn log_path(&self, pod: &Pod, container: Option<&str>) -> PathBuf {
        let base = format!("{}_{}", pod.namespace().unwrap_or_default(), pod.name_any());
        self.args.log_dir.join(match container {
            Some(c) => format!("{base}.{c}.log"),
            None => format!("{base}.log"),
        })
    }

    /// Runs the Pod's init containers in order, each until it exits 0
    /// (retried 2 s after a failure, as restartPolicy Always does); false
    /// when the Pod went away meanwhile.
    async fn run_init(&self, pod: &Pod, ip: Ipv4Addr) -> Result<bool> {
        let k = key(pod);
        let inits = pod
            .spec
            .as_ref()
            .and_then(|s| s.init_containers.clone())
            .unwrap_or_default();
        let mut statuses: Vec<serde_json::Value> = Vec::new();
        for c in &inits {
            let image = c.image.clone().unwrap_or_default();
            let mut restarts = 0;
            loop {
                let log_path = self.log_path(pod, Some(&c.name));
                let mut child = self.spawn(pod, c, ip, &log_path).await?;
                if let Some(slot) = self.initializing.lock().await.get_mut(&k) {
                    *slot = child.id();
                } else {
                    let _ = child.kill().await;
                    return Ok(false);
                }
                let now = jiff::Timestamp::now().to_string();
                let mut current = statuses.clone();
                current.push(
                    json!({"name": c.name, "image": image, "imageID": "", "ready": false,
                    "restartCount": restarts, "state": {"running": {"startedAt": now}}}),
                );
                self.report_init(pod, ip, current).await?;
                let code = child.wait().await?.code().unwrap_or(-1);
                if !self.initializing.lock().await.contains_key(&k) {
                    return Ok(false);
                }
                let done = jiff::Timestamp::now().to_string();
                let mut terminated = json!({"exitCode": code, "startedAt": now, "finishedAt": done,
                    "reason": if code == 0 { "Completed" } else { "Error" }});
                if code != 0 {
                    terminated["message"] = json!(log_tail(&log_path, 2048));
                }
                let state = json!({"name": c.name, "image": image, "imageID": "", "ready": code == 0,
                    "restartCount": restarts, "state": {"terminated": terminated}});
                if code == 0 {
                    statuses.push(state);
                    break;
                }
                eprintln!("kubelet: {k}/{} exited {code}; retrying", c.name);
                let mut current = statuses.clone();
                current.push(state);
                self.report_init(pod, ip, current).await?;
                restarts += 1;
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
        self.init_statuses
            .lock()
            .await
            .insert(k, serde_json::Value::Array(statuses));
        Ok(true)
    }

    /// The Pod's status while its init containers run.
    async fn report_init(
        &self,
        pod: &Pod,
        ip: Ipv4Addr,
        statuses: Vec<serde_json::Value>,
    ) -> Result<()> {
        let api: Api<Pod> =
            Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
        let status = json!({"status": {
            "phase": "Pending",
            "hostIP": ip.to_string(),
            "podIP": ip.to_string(),
            "podIPs": [{"ip": ip.to_string()}],
            "conditions": [
                {"type": "Initialized", "status": "False"},
                {"type": "PodScheduled", "status": "True"},
                {"type": "ContainersReady", "status": "False"},
                {"type": "Ready", "status": "False"},
            ],
            "initContainerStatuses": statuses,
        }});
        api.patch_status(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await?;
        Ok(())
    }

    /// Init containers, then the first container (a restart runs only the
    /// latter, as a kubelet does).
    async fn start(&self, pod: &Pod, restarts: i32, ip: Option<Ipv4Addr>) -> Result<()> {
        let Some(c) = pod
            .spec
            .as_ref()
            .and_then(|s| s.containers.first())
            .cloned()
        else {
            return Ok(());
        };
        let first = ip.is_none();
        let ip = match ip {
            Some(ip) => ip,
            None => self.ip().await?,
        };
        if first {
            // on_pod marked the Pod as initializing.
            let ran = self.run_init(pod, ip).await;
            let still_here = self.initializing.lock().await.remove(&key(pod)).is_some();
            if !ran? || !still_here {
                return Ok(());
            }
        }
        let log_path = self.log_path(pod, None);
        let child = self.spawn(pod, &c, ip, &log_path).await?;
        self.running.lock().await.insert(
            key(pod),
            Running {
                child,
                ip,
                restarts,
            },
        );
        self.report(pod, ip, false, restarts).await
    }

    /// The Pod's ServiceAccount credentials as a kubeconfig file, unless the
    /// Pod opts out (`automountServiceAccountToken: false`).
    async fn credentials(&self, pod: &Pod) -> Result<Option<PathBuf>> {
        let spec = pod.spec.as_ref();
        if spec.and_then(|s| s.automount_service_account_token) == Some(false) {
            return Ok(None);
        }
        let ns = pod.namespace().unwrap_or_default();
        let sa = spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &ns);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![],
                // A week: long enough for a demo left running.
                expiration_seconds: Some(7 * 24 * 3600),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(pod.name_any()),
                    uid: pod.metadata.uid.clone(),
                }),
            },
            ..Default::default()
        };
        let token = api
            .create_token_request(&sa, &PostParams::default(), &request)
            .await
            .with_context(|| format!("a token for ServiceAccount {ns}/{sa}"))?
            .status
            .map(|s| s.token)
            .context("the TokenRequest has no status")?;
        let config = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "cluster", "cluster": self.cluster}],
            "users": [{"name": sa, "user": {"token": token}}],
            "contexts": [{"name": "pod", "context": {"cluster": "cluster", "user": sa, "namespace": ns}}],
            "current-context": "pod",
        });
        let path = self
            .args
            .log_dir
            .join(format!("{ns}_{}.kubeconfig", pod.name_any()));
        write_private(&path, serde_saphyr::to_string(&config)?.as_bytes())?;
        Ok(Some(path))
    }

    /// The keys of a Secret or ConfigMap volume (empty when it is optional
    /// and missing); `None` for other volumes.
    async fn volume_data(&self, ns: &str, v: &Volume) -> Result<Option<DataVolume>> {
        use k8s_openapi::api::core::v1::{ConfigMap, Secret};
        if let Some(sv) = &v.secret {
            let name = sv.secret_name.clone().unwrap_or_default();
            let api: Api<Secret> = Api::namespaced(self.client.clone(), ns);
            let data = match api.get_opt(&name).await? {
                Some(s) => s
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .collect(),
                None if sv.optional == Some(true) => BTreeMap::new(),
                None => anyhow::bail!("secret `{ns}/{name}` not found"),
            };
            return Ok(Some(DataVolume {
                kind: "secret",
                name,
                data,
                items: sv.items.clone(),
                optional: sv.optional == Some(true),
            }));
        }
        if let Some(cv) = &v.config_map {
            let name = cv.name.clone();
            let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
            let data = match api.get_opt(&name).await? {
                Some(c) => c
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes()))
                    .collect(),
                None if cv.optional == Some(true) => BTreeMap::new(),
                None => anyhow::bail!("configmap `{ns}/{name}` not found"),
            };
            return Ok(Some(DataVolume {
                kind: "configmap",
                name,
                data,
                items: cv.items.clone(),
                optional: cv.optional == Some(true),
            }));
        }
        Ok(None)
    }

    /// Where the Secret volumes of the Pod `namespace/name` are written.
    fn secret_dir(&self, k: &str) -> PathBuf {
        self.args.log_dir.join("secrets").join(k.replace('/', "_"))
    }

    /// Secret and ConfigMap volumes: each mounted object's keys (or its `items`) written
    /// as files, mode 0600, into a directory of the Pod's own, and the
    /// mount paths in `argv` rewritten to it, as hostPath mounts are
    /// (`subPath` names one file of it). An object that is missing (and not
    /// `optional`) is an error: the Pod is not started (tried again at its
    /// next change; a real kubelet keeps retrying the mount).
    async fn data_volumes(
        &self,
        pod: &Pod,
        c: &Container,
        argv: Vec<String>,
    ) -> Result<Vec<String>> {
        use std::io::Write as _;
        use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
        let volumes = pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.clone())
            .unwrap_or_default();
        let ns = pod.namespace().unwrap_or_default();
        let root = self.secret_dir(&key(pod));
        let mut mounts: BTreeMap<String, PathBuf> = BTreeMap::new();
        for m in c.volume_mounts.clone().unwrap_or_default() {
            let Some(v) = volumes.iter().find(|v| v.name == m.name) else {
                continue;
            };
            let Some(sv) = self.volume_data(&ns, v).await? else {
                continue;
            };
            let DataVolume {
                kind: what,
                name: secret_name,
                data,
                items,
                optional,
            } = sv;
            // Keys and the files they become.
            let files: Vec<(String, String)> = match &items {
                Some(items) => items
                    .iter()
                    .map(|i| (i.key.clone(), i.path.clone()))
                    .collect(),
                None => data.keys().map(|k| (k.clone(), k.clone())).collect(),
            };
            let dir = root.join(&m.name);
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .with_context(|| format!("creating {}", dir.display()))?;
            for (k, rel) in files {
                let Some(value) = data.get(&k) else {
                    if optional {
                        continue;
                    }
                    anyhow::bail!("{what} `{ns}/{secret_name}` has no key `{k}`");
                };
                let rel_path = std::path::Path::new(&rel);
                anyhow::ensure!(
                    rel_path
                        .components()
                        .all(|c| matches!(c, std::path::Component::Normal(_))),
                    "{what} item path `{rel}` must be relative, without `..`"
                );
                let path = dir.join(rel_path);
                if let Some(parent) = path.parent() {
                    std::fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(parent)?;
                }
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .with_context(|| format!("writing {}", path.display()))?;
                f.write_all(value)?;
            }
            let target = match &m.sub_path {
                Some(sp) if !sp.is_empty() => dir.join(sp),
                _ => dir,
            };
            mounts.insert(m.mount_path.clone(), target);
        }
        if mounts.is_empty() {
            return Ok(argv);
        }
        Ok(argv
            .into_iter()
            .map(|a| {
                for (mount, local) in &mounts {
                    if a == *mount {
                        return local.display().to_string();
                    }
                    if let Some(rest) = a.strip_prefix(&format!("{mount}/")) {
                        return local.join(rest).display().to_string();
                    }
                }
                a
            })
            .collect())
    }

    async fn report(&self, pod: &Pod, ip: Ipv4Addr, ready: bool, restarts: i32) -> Result<()> {
        let api: Api<Pod> =
            Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
        let r = if ready { "True" } else { "False" };
        let name = pod
            .spec
            .as_ref()
            .and_then(|s| s.containers.first())
            .map(|c| c.name.clone())
            .unwrap_or_default();
        let image = pod
            .spec
            .as_ref()
            .and_then(|s| s.containers.first())
            .and_then(|c| c.image.clone())
            .unwrap_or_default();
        let now = jiff::Timestamp::now().to_string();
        let inits = self
            .init_statuses
            .lock()
            .await
            .get(&key(pod))
            .cloned()
            .unwrap_or_else(|| json!([]));
        let status = json!({"status": {
            "initContainerStatuses": inits,
            "phase": "Running",
            "hostIP": ip.to_string(),
            "podIP": ip.to_string(),
            "podIPs": [{"ip": ip.to_string()}],
            "startTime": now,
            "conditions": [
                {"type": "Initialized", "status": "True"},
                {"type": "PodScheduled", "status": "True"},
                {"type": "ContainersReady", "status": r},
                {"type": "Ready", "status": r},
            ],
            "containerStatuses": [{
                "name": name, "image": image, "imageID": "", "ready": ready,
                "restartCount": restarts, "started": true,
                "state": {"running": {"startedAt": now}},
            }],
        }});
        api.patch_status(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await?;
        Ok(())
    }

    async fn stop(&self, k: &str) {
        let _ = std::fs::remove_dir_all(self.secret_dir(k));
        self.init_statuses.lock().await.remove(k);
        if let Some(Some(pid)) = self.initializing.lock().await.remove(k) {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
            eprintln!("kubelet: stopped {k} while it initialized");
        }
        // Not held while the process winds down: stops run side by side.
        let removed = self.running.lock().await.remove(k);
        if let Some(mut r) = removed {
            if let Some(pid) = r.child.id() {
                let _ = std::process::Command::new("kill")
                    .arg("-TERM")
                    .arg(pid.to_string())
                    .status();
            }
            if tokio::time::timeout(Duration::from_secs(5), r.child.wait())
                .await
                .is_err()
            {
                let _ = r.child.kill().await;
            }
            eprintln!("kubelet: stopped {k}");
        }
    }

    async fn on_pod(self: &Arc<Self>, pod: Pod) -> Result<()> {
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        if !self.args.nodes.contains(&node) {
            return Ok(());
        }
        let k = key(&pod);
        if pod.metadata.deletion_timestamp.is_some() {
            self.stop(&k).await;
            let api: Api<Pod> =
                Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
            let _ = api
                .delete(
                    &pod.name_any(),
                    &DeleteParams {
                        grace_period_seconds: Some(0),
                        ..Default::default()
                    },
                )
                .await;
            return Ok(());
        }
        if self.running.lock().await.contains_key(&k)
            || self.initializing.lock().await.contains_key(&k)
        {
            return Ok(());
        }
        // Init containers may run for minutes (a model download): the
        // watch goes on meanwhile.
        self.initializing.lock().await.insert(k.clone(), None);
        let me = self.clone();
        tokio::spawn(async move {
            if let Err(e) = me.start(&pod, 0, None).await {
                me.initializing.lock().await.remove(&k);
                eprintln!("kubelet: cannot run {k}: {e:#}");
            }
        });
        Ok(())
    }

    /// Probe readiness and restart exited processes, once a second.
    async fn supervise(self: Arc<Self>) {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap_or_default();
        let mut last_ready: HashMap<String, bool> = HashMap::new();
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let keys: Vec<String> = self.running.lock().await.keys().cloned().collect();
            for k in keys {
                let Some((ns, name)) = k.split_once('/') else {
                    continue;
                };
                let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
                let Ok(Some(pod)) = api.get_opt(name).await else {
                    self.stop(&k).await;
                    continue;
                };
                let (exited, ip, restarts) = {
                    let mut running = self.running.lock().await;
                    let Some(r) = running.get_mut(&k) else {
                        continue;
                    };
                    (
                        r.child.try_wait().ok().flatten().is_some(),
                        r.ip,
                        r.restarts,
                    )
                };
                if exited {
                    eprintln!("kubelet: {k} exited; restarting");
                    self.running.lock().await.remove(&k);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    if let Err(e) = self.start(&pod, restarts + 1, Some(ip)).await {
                        eprintln!("kubelet: cannot restart {k}: {e:#}");
                    }
                    continue;
                }
                let probe = pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.containers.first())
                    .and_then(|c| c.readiness_probe.as_ref())
                    .and_then(|p| p.http_get.clone());
                let ready = match probe {
                    None => true,
                    Some(g) => {
                        let c = pod.spec.as_ref().and_then(|s| s.containers.first());
                        let port = match &g.port {
                            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(p) => {
                                Some(*p)
                            }
                            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(
                                n,
                            ) => c
                                .and_then(|c| c.ports.as_ref())
                                .and_then(|ps| {
                                    ps.iter().find(|p| p.name.as_deref() == Some(n.as_str()))
                                })
                                .map(|p| p.container_port),
                        };
                        match port {
                            Some(port) => {
                                let url = format!(
                                    "http://{ip}:{port}{}",
                                    g.path.unwrap_or_else(|| "/".into())
                                );
                                http.get(url)
                                    .send()
                                    .await
                                    .map(|r| r.status().is_success())
                                    .unwrap_or(false)
                            }
                            None => false,
                        }
                    }
                };
                if last_ready.get(&k) != Some(&ready) {
                    if let Err(e) = self.report(&pod, ip, ready, restarts).await {
                        eprintln!("kubelet: status of {k}: {e:#}");
                        continue;
                    }
                    eprintln!("kubelet: {k} ready={ready}");
                    last_ready.insert(k, ready);
                }
            }
        }
    }
}

/// The last `max` bytes of a log file (a failed init container's message).
fn log_tail(path: &std::path::Path, max: usize) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let from = bytes.len().saturating_sub(max);
    String::from_utf8_lossy(&bytes[from..]).into_owned()
}

/// The cluster entry of this stand-in's own kubeconfig (server and CA).
fn own_cluster() -> Result<kube::config::Cluster> {
    let config = kube::config::Kubeconfig::read().context("reading the kubeconfig")?;
    let context = config
        .current_context
        .as_deref()
        .context("the kubeconfig has no current context")?;
    let cluster = config
        .contexts
        .iter()
        .find(|c| c.name == context)
        .and_then(|c| c.context.as_ref())
        .map(|c| c.cluster.clone())
        .context("the current context is not in the kubeconfig")?;
    config
        .clusters
        .into_iter()
        .find(|c| c.name == cluster)
        .and_then(|c| c.cluster)
        .context("the current cluster is not in the kubeconfig")
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let client = Client::try_default().await?;
    let cluster = own_cluster()?;
    let kubelet = Arc::new(Kubelet {
        args,
        client: client.clone(),
        cluster,
        running: Mutex::default(),
        initializing: Mutex::default(),
        init_statuses: Mutex::default(),
        next_ip: Mutex::new(1),
    });
    tokio::spawn(kubelet.clone().supervise());
    let apis: Vec<Api<Pod>> = if kubelet.args.namespace.is_empty() {
        vec![Api::all(client)]
    } else {
        kubelet
            .args
            .namespace
            .iter()
            .map(|ns| Api::namespaced(client.clone(), ns))
            .collect()
    };
    let mut stream = futures::stream::select_all(
        apis.into_iter()
            .map(|api| watcher::watcher(api, watcher::Config::default()).boxed()),
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut shutdown = Box::pin(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
    });
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            ev = stream.next() => match ev {
                Some(Ok(Event::Apply(p) | Event::InitApply(p))) => { kubelet.on_pod(p).await?; }
                Some(Ok(Event::Delete(p))) => kubelet.stop(&key(&p)).await,
                Some(Ok(_)) => {}
                Some(Err(e)) => eprintln!("kubelet: watch: {e}"),
                None => break,
            }
        }
    }
    let keys: Vec<String> = kubelet.running.lock().await.keys().cloned().collect();
    futures::future::join_all(keys.iter().map(|k| kubelet.stop(k))).await;
    Ok(())
}
