//! Support for tests against a real Kubernetes API server.
//!
//! [`cluster`] gives a client for the cluster the tests run against: the one
//! `KUBECONFIG` points at when it is reachable (kind, k3s, a real cluster),
//! otherwise the local control plane of `e2e/cluster.sh`, started on first
//! use and reused by every later test process.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

pub mod processes;

/// Root of the workspace.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The kubeconfig the tests use, bringing up the local control plane if
/// no reachable cluster is configured.
pub fn kubeconfig() -> Result<PathBuf> {
    static PATH: std::sync::OnceLock<std::result::Result<PathBuf, String>> =
        std::sync::OnceLock::new();
    PATH.get_or_init(|| find_or_start().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn find_or_start() -> Result<PathBuf> {
    if let Ok(kc) = std::env::var("KUBECONFIG")
        && !kc.is_empty()
        && Command::new("kubectl")
            .args(["get", "--raw", "/readyz", "--request-timeout=5s"])
            .env("KUBECONFIG", &kc)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    {
        return Ok(PathBuf::from(kc));
    }
    let script = workspace_root().join("e2e/cluster.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg("up")
        .env_remove("KUBECONFIG")
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "e2e/cluster.sh up failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let env = Command::new("bash").arg(&script).arg("env").output()?;
    let text = String::from_utf8_lossy(&env.stdout);
    let path = text
        .lines()
        .find_map(|l| l.strip_prefix("export KUBECONFIG="))
        .context("e2e/cluster.sh env printed no KUBECONFIG")?;
    Ok(PathBuf::from(path.trim()))
}

/// A client for the test cluster.
pub async fn client() -> Result<Client> {
    let path = kubeconfig()?;
    let kc = Kubeconfig::read_from(&path).with_context(|| format!("reading {}", path.display()))?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

/// Run kubectl against the test cluster.
pub fn kubectl(args: &[&str]) -> Result<Output> {
    kubectl_command(args)?.output().context("running kubectl")
}

/// `kubectl apply -f -` of a manifest (YAML, one or more documents), in
/// `ns` when given; fails with kubectl's stderr.
pub fn kubectl_apply(ns: Option<&str>, manifest: &str) -> Result<()> {
    use std::io::Write as _;
    let mut args = vec!["apply", "-f", "-"];
    if let Some(ns) = ns {
        args.extend(["-n", ns]);
    }
    let mut child = kubectl_command(&args)?
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running kubectl")?;
    child
        .stdin
        .take()
        .context("kubectl's stdin")?
        .write_all(manifest.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "kubectl apply failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn kubectl_command(args: &[&str]) -> Result<Command> {
    let path = kubeconfig()?;
    let mut cmd = Command::new("kubectl");
    cmd.args(args)
        .env("KUBECONFIG", path)
        .current_dir(workspace_root());
    // helm and friends from the cache, when `up` fetched them.
    if let Some(home) = std::env::var_os("HOME") {
        let tools = PathBuf::from(home).join(".cache/copyhold/bin");
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![tools];
        paths.extend(std::env::split_paths(&path));
        if let Ok(joined) = std::env::join_paths(paths) {
            cmd.env("PATH", joined);
        }
    }
    Ok(cmd)
}

/// `kubectl create secret generic NAME -n NS --from-literal=KEY=VALUE`,
/// labelled as a member's API key (`copyhold.dev/api-key=true`): the
/// gateway reads no other Secret.
pub fn create_secret(ns: &str, name: &str, key: &str, value: &str) -> Result<()> {
    create_unlabelled_secret(ns, name, key, value)?;
    let label = format!("{}=true", copyhold::gateway::catalog::KEY_LABEL);
    kubectl_ok(&["label", "secret", name, "-n", ns, &label]).map(drop)
}

/// A Secret without the API-key label (the gateway never reads it).
pub fn create_unlabelled_secret(ns: &str, name: &str, key: &str, value: &str) -> Result<()> {
    let literal = format!("--from-literal={key}={value}");
    kubectl_ok(&["create", "secret", "generic", name, "-n", ns, &literal]).map(drop)
}

/// The metrics address in a gateway's first line (`copyhold gateway
/// listening on ADDR (metrics on MADDR) as ID`).
pub fn gateway_metrics_addr(line: &str) -> Result<String> {
    line.split_once("(metrics on ")
        .and_then(|(_, rest)| rest.split_once(')'))
        .map(|(addr, _)| addr.to_string())
        .with_context(|| format!("no metrics address in {line:?}"))
}

/// A Ready serving Pod of ModelDeployment `md` at `addr`, owned through a
/// Deployment `name` the way the controller's Pods are (see
/// `copyhold::bench::stand_in`). Returns the Pod's name.
pub async fn serving_pod(
    client: &Client,
    ns: &str,
    md: &str,
    name: &str,
    addr: &str,
) -> Result<String> {
    copyhold::bench::stand_in::serving_pod(client, ns, md, name, addr).await
}

/// Run kubectl and return stdout, failing with stderr when it fails.
pub fn kubectl_ok(args: &[&str]) -> Result<String> {
    let out = kubectl(args)?;
    if !out.status.success() {
        bail!(
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Retry `f` until it succeeds or `timeout` passes; the last error is returned.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e.context("timed out")),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// Install (or update) copyhold's CRDs from `crds/` and wait until they
/// are Established and served.
pub async fn install_crds() -> Result<()> {
    kubectl_ok(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager=copyhold-e2e",
        "-f",
        "crds/",
    ])?;
    kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "-f",
        "crds/",
    ])?;
    // Discovery lags establishment by a moment.
    eventually(Duration::from_secs(30), || async {
        let out = kubectl_ok(&["api-resources", "--api-group=copyhold.dev", "-o", "name"])?;
        if out.lines().count() >= 3 {
            Ok(())
        } else {
            bail!("copyhold.dev not yet in discovery: {out}")
        }
    })
    .await
}

/// A namespace of its own for one test, deleted when dropped.
pub struct TestNamespace {
    pub name: String,
}

impl TestNamespace {
    pub fn create(prefix: &str) -> Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .subsec_nanos();
        let name = format!("{prefix}-{}-{nanos:x}", std::process::id());
        kubectl_ok(&["create", "namespace", &name])?;
        // The namespace's default ServiceAccount comes from the controller-manager.
        Ok(Self { name })
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        // Without a kubelet, a bound Pod never finishes terminating and keeps
        // its GPUs in the scheduler's books: remove Pods at once.
        let ns = self.name.as_str();
        let _ = kubectl(&[
            "delete",
            "modeldeployments.copyhold.dev,deployments,replicasets",
            "--all",
            "-n",
            ns,
            "--wait=false",
        ]);
        for _ in 0..40 {
            let _ = kubectl(&[
                "delete",
                "pods",
                "--all",
                "-n",
                ns,
                "--grace-period=0",
                "--force",
            ]);
            let left = kubectl(&["get", "pods,replicasets", "-n", ns, "-o", "name"]);
            if left.map(|o| o.stdout.is_empty()).unwrap_or(true) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
        let _ = kubectl(&["delete", "namespace", ns, "--wait=false"]);
    }
}

/// Exclusive use of the simulated fleet's GPUs, across threads and test
/// processes: tests that allocate GPUs hold it so their expectations about
/// free cards hold.
pub struct FleetLock {
    _file: std::fs::File,
}

impl FleetLock {
    pub fn acquire() -> Result<Self> {
        let dir = std::env::temp_dir().join("copyhold-e2e");
        std::fs::create_dir_all(&dir)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("fleet.lock"))?;
        file.lock()?;
        Ok(Self { _file: file })
    }
}

/// Manifests of a directory (not recursing), sorted by name.
pub fn manifests(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    Ok(files)
}

/// The `# expect: …` line of an invalid manifest.
pub fn expected_message(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path)?;
    text.lines()
        .find_map(|l| l.strip_prefix("# expect: "))
        .map(str::to_owned)
        .with_context(|| format!("{} has no `# expect:` line", path.display()))
}

/// Path of a binary of this workspace, built by the test run (cargo builds a
/// package's binaries for its integration tests). Built here if missing.
pub fn workspace_bin(package: &str, name: &str) -> Result<PathBuf> {
    // Test executables live in <target>/<profile>/deps/.
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("test executable has no profile directory")?
        .to_path_buf();
    let bin = profile_dir.join(name);
    if !bin.exists() {
        let st = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "-p", package, "--bin", name])
            .current_dir(workspace_root())
            .status()?;
        anyhow::ensure!(st.success(), "cargo build -p {package} --bin {name} failed");
    }
    anyhow::ensure!(bin.exists(), "{} not found", bin.display());
    Ok(bin)
}

/// The kubelet stand-in for `namespace`, running copyhold-node images as
/// `node_bin` on Pod IPs under `ip_prefix`, logging under a temp directory
/// named for `log_name`; stopped when dropped.
pub fn start_kubelet(
    kubelet_bin: &Path,
    namespace: &str,
    ip_prefix: &str,
    node_bin: &Path,
    log_name: &str,
) -> Result<KubeletGuard> {
    start_kubelet_for(
        kubelet_bin,
        &[namespace],
        ip_prefix,
        &[("ghcr.io/copyhold/copyhold-node", node_bin)],
        log_name,
    )
}

/// The kubelet stand-in for Pods of `namespaces`, each image prefix mapped
/// to a binary (the first matching prefix wins), on Pod IPs under
/// `ip_prefix`; Pod logs in `<tmp>/copyhold-kubelet-<log_name>/`.
pub fn start_kubelet_for(
    kubelet_bin: &Path,
    namespaces: &[&str],
    ip_prefix: &str,
    images: &[(&str, &Path)],
    log_name: &str,
) -> Result<KubeletGuard> {
    let log_dir = kubelet_log_dir(log_name);
    let mut cmd = Command::new(kubelet_bin);
    cmd.arg("--namespace")
        .arg(namespaces.join(","))
        .args(["--ip-prefix", ip_prefix]);
    for (prefix, bin) in images {
        cmd.arg("--image")
            .arg(format!("{prefix}={}", bin.display()));
    }
    let child = cmd
        .arg("--log-dir")
        .arg(&log_dir)
        .env("KUBECONFIG", kubeconfig()?)
        .stdout(std::process::Stdio::null())
        .stderr(
            std::fs::File::create(log_dir.with_extension("log"))
                .map_or_else(|_| std::process::Stdio::null(), std::process::Stdio::from),
        )
        .spawn()
        .context("starting the kubelet stand-in")?;
    Ok(KubeletGuard(child))
}

/// The kubelet stand-in, stopped when dropped with SIGTERM, so it stops its
/// Pods' processes first (a SIGKILL would orphan them); killed after 20 s.
pub struct KubeletGuard(std::process::Child);

impl Drop for KubeletGuard {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        for _ in 0..200 {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Where the stand-in named `log_name` writes its Pods' logs.
pub fn kubelet_log_dir(log_name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("copyhold-kubelet-{log_name}"))
}

/// Whether the tests run on the local control plane of `e2e/cluster.sh`
/// (Pods run by the kubelet stand-in) rather than a cluster given by
/// `KUBECONFIG` (real kubelets).
pub fn local_cluster() -> Result<bool> {
    let kc = Kubeconfig::read_from(kubeconfig()?)?;
    // `e2e/cluster.sh` names its context so.
    Ok(kc.current_context.as_deref() == Some("copyhold-test"))
}

/// A child process killed when dropped.
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `copyhold controller` for one test namespace, as the tests run it: no
/// leader election, a 2 s resync, metrics on a free port; `extra` adds the
/// test's own flags (its budget selector, the node device, a model cache).
/// Stopped when the guard drops.
pub fn start_controller(ns: &str, extra: &[&str]) -> Result<ChildGuard> {
    start_controller_resync(ns, 2, extra)
}

/// [`start_controller`] with its resync every `resync_seconds`: a test that
/// shows what a watch triggers runs with the default 300 s, so the resync
/// cannot do the watch's work.
pub fn start_controller_resync(
    ns: &str,
    resync_seconds: u64,
    extra: &[&str],
) -> Result<ChildGuard> {
    Ok(ChildGuard(
        Command::new(workspace_bin("copyhold", "copyhold")?)
            .args(["controller", "--metrics-addr", "127.0.0.1:0"])
            .args(["--leader-election=false", "--resync-seconds"])
            .arg(resync_seconds.to_string())
            .args(["--watch-namespace", ns])
            .args(extra)
            .env("KUBECONFIG", kubeconfig()?)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()?,
    ))
}

/// The fixture models with reference outputs (`tests/fixtures`, or
/// `COPYHOLD_FIXTURES`). Panics naming the path it looked for when they are
/// not there, rather than failing later with a bare "No such file".
pub fn fixtures() -> PathBuf {
    let dir = std::env::var_os("COPYHOLD_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("tests/fixtures"));
    assert!(
        dir.join("tiny-llama/config.json").is_file(),
        "fixture models not found: looked for {}/tiny-llama/config.json (set COPYHOLD_FIXTURES to their folder)",
        dir.display()
    );
    dir
}

/// The cache directory of builds and tools (`~/.cache/copyhold`).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("COPYHOLD_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/copyhold")
        })
}

/// helm, fetched by `e2e/cluster.sh tools` when missing.
pub fn helm() -> Result<PathBuf> {
    let helm = cache_dir().join("bin/helm");
    if !helm.exists() {
        let st = Command::new("bash")
            .arg(workspace_root().join("e2e/cluster.sh"))
            .arg("tools")
            .status()?;
        anyhow::ensure!(st.success(), "e2e/cluster.sh tools failed");
    }
    Ok(helm)
}

/// helm against the test cluster, from the workspace root.
pub fn cluster_helm(args: &[&str]) -> Result<Output> {
    Ok(Command::new(helm()?)
        .args(args)
        .env("KUBECONFIG", kubeconfig()?)
        .current_dir(workspace_root())
        .output()?)
}

/// [`cluster_helm`], failing with helm's output unless it succeeds.
pub fn cluster_helm_ok(args: &[&str]) -> Result<String> {
    let out = cluster_helm(args)?;
    if !out.status.success() {
        bail!(
            "helm {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A Python with the official `openai` client, in the cache's venv.
pub fn openai_python() -> Result<PathBuf> {
    let venv = cache_dir().join("venv");
    let py = venv.join("bin/python");
    let ok = Command::new(&py)
        .args(["-c", "import openai"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        anyhow::ensure!(
            Command::new("python3")
                .args(["-m", "venv"])
                .arg(&venv)
                .status()?
                .success(),
            "python3 -m venv {}",
            venv.display()
        );
        anyhow::ensure!(
            Command::new(venv.join("bin/pip"))
                .args(["install", "-q", "openai"])
                .status()?
                .success(),
            "pip install openai"
        );
    }
    Ok(py)
}
