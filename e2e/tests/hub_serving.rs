//! A model from a Hub: a ModelDeployment names a repository on a local hub
//! (the Hub's protocol, served by copyhold_hub from a copy of the fixture,
//! paced so the download takes seconds) → the controller sizes it from
//! config.json and the safetensors header read with range requests → the
//! Pod's init container `copyhold-node fetch` downloads it into the node
//! cache with its progress in `status.download` → the engine serves it →
//! Ready → an answer. A second ModelDeployment of the same model finds it
//! in the cache: the hub's access log shows one download of the weights.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use copyhold::resources::ModelDeployment;
use copyhold_e2e::{
    ChildGuard, FleetLock, TestNamespace, eventually, fixtures, install_crds, kubeconfig,
    workspace_bin,
};
use copyhold_hub::server::{HubOptions, spawn_local};
use k8s_openapi::api::core::v1::{ConfigMap, Event, Pod};
use kube::api::{Api, ListParams};

const REPO: &str = "town/tiny-llama";

/// `kubectl apply`, retried while the API server's OpenAPI document lags
/// the CRD just installed (kubectl validates against it).
async fn apply(ns: &str, path: &std::path::Path) -> Result<()> {
    let path = path.to_string_lossy().into_owned();
    eventually(Duration::from_secs(60), || async {
        copyhold_e2e::kubectl_ok(&["apply", "-n", ns, "-f", &path]).map(|_| ())
    })
    .await
}

fn manifest(name: &str, endpoint: &str) -> String {
    manifest_of(name, REPO, endpoint)
}

fn manifest_of(name: &str, repo: &str, endpoint: &str) -> String {
    format!(
        r#"apiVersion: copyhold.dev/v1alpha1
kind: ModelDeployment
metadata: {{name: {name}}}
spec:
  model:
    source: {{huggingFace: {{repo: {repo}, endpoint: "{endpoint}"}}}}
    servedName: {name}
  serving: {{contextLength: 256, maxConcurrentSequences: 2}}
  replicas: 1
"#
    )
}

async fn ready(mds: &Api<ModelDeployment>, name: &str) -> Result<ModelDeployment> {
    eventually(Duration::from_secs(180), || async {
        let md = mds.get(name).await?;
        let st = md.status.clone().context("no status yet")?;
        if st.ready_replicas >= 1 && st.state.as_deref() == Some("Ready") {
            Ok(md)
        } else {
            bail!(
                "state {:?}, download {:?}, conditions {:?}",
                st.state,
                st.download,
                st.conditions
            )
        }
    })
    .await
}

async fn answer(client: &kube::Client, ns: &str, name: &str) -> Result<serde_json::Value> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let list = pods
        .list(&ListParams::default().labels(&format!("copyhold.dev/model-deployment={name}")))
        .await?;
    let ip = list
        .items
        .iter()
        .find_map(|p| p.status.as_ref()?.pod_ip.clone())
        .context("the Pod has an IP")?;
    let body: serde_json::Value = reqwest::Client::new()
        .post(format!("http://{ip}:8000/v1/chat/completions"))
        .json(&serde_json::json!({
            "model": name,
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 4,
            "temperature": 0
        }))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(body)
}

/// Full-file downloads of the weights in the hub's log (the controller's
/// header reads ask for a few bytes; the fetch for the whole file).
fn weight_downloads(hub: &copyhold_hub::server::Hub, size: u64) -> usize {
    let whole = format!("bytes=0-{}", size - 1);
    hub.access_log()
        .iter()
        .filter(|a| {
            a.method == "GET"
                && a.path.starts_with("/lfs/")
                && a.range.as_deref() == Some(whole.as_str())
        })
        .count()
}

#[tokio::test]
async fn a_model_deployment_naming_a_hub_repo_is_fetched_with_progress_sized_and_served_and_a_second_hits_the_cache()
-> Result<()> {
    let _fleet = FleetLock::acquire()?;
    install_crds().await?;
    let client = copyhold_e2e::client().await?;
    let ns = TestNamespace::create("hub")?;
    let kc = kubeconfig()?;
    let node_bin = workspace_bin("copyhold-node", "copyhold-node")?;

    // The hub: a copy of the fixture as town/tiny-llama, paced to 150 KB/s
    // so the ~0.9 MB of weights take a few seconds and progress shows.
    let work = std::env::temp_dir().join(format!("copyhold-e2e-hub-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let repo_dir = work.join("hub").join(REPO);
    std::fs::create_dir_all(&repo_dir)?;
    for e in std::fs::read_dir(fixtures().join("tiny-llama"))? {
        let e = e?;
        std::fs::copy(e.path(), repo_dir.join(e.file_name()))?;
    }
    let size = std::fs::metadata(repo_dir.join("model.safetensors"))?.len();
    let access_log = work.join("hub-access.log");
    let (endpoint, hub) = spawn_local(
        &work.join("hub"),
        HubOptions {
            bytes_per_sec: Some(150_000),
            access_log: Some(access_log.clone()),
            ..HubOptions::default()
        },
    )
    .await?;
    let cache = work.join("node-cache");

    let _kubelet = copyhold_e2e::start_kubelet(
        std::path::Path::new(env!("CARGO_BIN_EXE_copyhold-kubelet")),
        &ns.name,
        "127.0.102",
        &node_bin,
        "e2e-hub",
    )?;
    let _controller = controller(&ns.name, &cache)?;

    // `kubectl get md -w`, kept for the record.
    let watch_out = work.join("kubectl-get-md-w.txt");
    let _watch = ChildGuard(
        Command::new("kubectl")
            .args(["get", "md", "-w", "-n", &ns.name])
            .env("KUBECONFIG", &kc)
            .stdout(std::fs::File::create(&watch_out)?)
            .stderr(Stdio::null())
            .spawn()?,
    );

    let path = work.join("tiny.yaml");
    std::fs::write(&path, manifest("tiny", &endpoint))?;
    apply(&ns.name, &path).await?;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);

    // Progress shows while the init container downloads.
    let seen = eventually(Duration::from_secs(120), || async {
        let st = mds.get("tiny").await?.status.context("no status")?;
        match st.download {
            Some(d) if d.phase == "downloading" && d.bytes_total > 0 => Ok(d),
            other => bail!("no download in progress yet: {other:?} {:?}", st.state),
        }
    })
    .await?;
    assert!(seen.bytes_total as u64 >= size, "{seen:?}");

    let md = ready(&mds, "tiny").await?;
    let st = md.status.context("status")?;
    assert!(
        st.required_memory_bytes.unwrap_or(0) > 0,
        "sized from the hub"
    );
    let d = st.download.context("download status")?;
    assert_eq!(d.phase, "done", "{d:?}");
    let body = answer(&client, &ns.name, "tiny").await?;
    assert_eq!(body["usage"]["completion_tokens"], 4, "{body}");
    assert_eq!(weight_downloads(&hub, size), 1);

    // The second ModelDeployment of the same model: no second download.
    let path2 = work.join("tiny2.yaml");
    std::fs::write(&path2, manifest("tiny2", &endpoint))?;
    apply(&ns.name, &path2).await?;
    ready(&mds, "tiny2").await?;
    answer(&client, &ns.name, "tiny2").await?;
    assert_eq!(
        weight_downloads(&hub, size),
        1,
        "the second fetch found the verified blobs in the node cache"
    );

    let events: Api<Event> = Api::namespaced(client.clone(), &ns.name);
    let reasons: Vec<String> = events
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter_map(|e| e.reason.clone())
        .collect();
    assert!(reasons.iter().any(|r| r == "FetchStarted"), "{reasons:?}");
    assert!(reasons.iter().any(|r| r == "Fetched"), "{reasons:?}");

    eprintln!(
        "--- kubectl get md -w ---\n{}",
        std::fs::read_to_string(&watch_out)?
    );
    eprintln!(
        "--- hub access log ---\n{}",
        std::fs::read_to_string(&access_log)?
    );
    Ok(())
}

/// The controller for one test namespace, with the node cache at `cache`.
fn controller(ns: &str, cache: &std::path::Path) -> Result<ChildGuard> {
    controller_with(ns, cache, &[])
}

/// [`controller`] with more arguments.
fn controller_with(ns: &str, cache: &std::path::Path, extra: &[&str]) -> Result<ChildGuard> {
    let cache = cache.display().to_string();
    let mut args = vec![
        "--budget-selector",
        "copyhold-test=none",
        "--node-device",
        "cpu",
        "--model-cache-dir",
        &cache,
    ];
    args.extend_from_slice(extra);
    copyhold_e2e::start_controller(ns, &args)
}

/// Snapshots of `repo` in the node cache at `cache`.
fn snapshots(cache: &std::path::Path, repo: &str) -> usize {
    let dir = cache
        .join("models")
        .join(repo.replace('/', "--"))
        .join("snapshots");
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// The models the controller's in-use ConfigMap names in `ns`.
async fn in_use(client: &kube::Client, ns: &str) -> Result<Vec<String>> {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let cm = cms.get_opt("copyhold-models-in-use").await?;
    let text = cm
        .and_then(|c| c.data)
        .and_then(|mut d| d.remove("models"))
        .unwrap_or_default();
    Ok(text.lines().map(str::to_string).collect())
}

#[tokio::test]
async fn a_bounded_cache_evicts_only_models_that_no_model_deployment_uses() -> Result<()> {
    let _fleet = FleetLock::acquire()?;
    install_crds().await?;
    let client = copyhold_e2e::client().await?;
    let ns = TestNamespace::create("evict")?;
    let node_bin = workspace_bin("copyhold-node", "copyhold-node")?;
    let work = std::env::temp_dir().join(format!("copyhold-e2e-evict-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    // Three repos on the hub; one byte of cache, so every fetch evicts
    // every snapshot it may.
    for repo in ["town/tiny-a", "town/tiny-b", "town/tiny-c"] {
        let dir = work.join("hub").join(repo);
        std::fs::create_dir_all(&dir)?;
        for e in std::fs::read_dir(fixtures().join("tiny-llama"))? {
            let e = e?;
            std::fs::copy(e.path(), dir.join(e.file_name()))?;
        }
    }
    let (endpoint, _hub) = spawn_local(&work.join("hub"), HubOptions::default()).await?;
    let cache = work.join("node-cache");
    let _kubelet = copyhold_e2e::start_kubelet(
        std::path::Path::new(env!("CARGO_BIN_EXE_copyhold-kubelet")),
        &ns.name,
        "127.0.103",
        &node_bin,
        "e2e-evict",
    )?;
    let _controller = controller_with(&ns.name, &cache, &["--model-cache-max-bytes", "1"])?;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let deploy = |name: &'static str, repo: &'static str| {
        let path = work.join(format!("{name}.yaml"));
        let endpoint = endpoint.clone();
        let ns = ns.name.clone();
        async move {
            std::fs::write(&path, manifest_of(name, repo, &endpoint))?;
            apply(&ns, &path).await
        }
    };

    deploy("a", "town/tiny-a").await?;
    ready(&mds, "a").await?;
    // b's fetch is over the bound, but a is in use: kept.
    deploy("b", "town/tiny-b").await?;
    ready(&mds, "b").await?;
    assert_eq!(snapshots(&cache, "town/tiny-a"), 1, "a is served: kept");
    assert_eq!(snapshots(&cache, "town/tiny-b"), 1);
    eventually(Duration::from_secs(30), || async {
        let names = in_use(&client, &ns.name).await?;
        anyhow::ensure!(names == ["town/tiny-a", "town/tiny-b"], "in use: {names:?}");
        Ok(())
    })
    .await?;

    // a is deleted: the list drops it, and c's fetch evicts it.
    mds.delete("a", &Default::default()).await?;
    eventually(Duration::from_secs(30), || async {
        let names = in_use(&client, &ns.name).await?;
        anyhow::ensure!(names == ["town/tiny-b"], "in use: {names:?}");
        Ok(())
    })
    .await?;
    deploy("c", "town/tiny-c").await?;
    ready(&mds, "c").await?;
    assert_eq!(
        snapshots(&cache, "town/tiny-a"),
        0,
        "no one uses a: evicted"
    );
    assert_eq!(snapshots(&cache, "town/tiny-b"), 1, "b is served: kept");
    assert_eq!(snapshots(&cache, "town/tiny-c"), 1);
    answer(&client, &ns.name, "b").await?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// `sha256sum * > SHA256SUMS` in `dir`.
fn write_manifest(dir: &std::path::Path) -> Result<()> {
    use sha2::Digest as _;
    let mut names: Vec<_> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()?;
    names.sort();
    let mut out = String::new();
    for n in names {
        let sha = sha2::Sha256::digest(std::fs::read(dir.join(&n))?);
        out.push_str(&format!("{sha:x}  {}\n", n.to_string_lossy()));
    }
    std::fs::write(dir.join("SHA256SUMS"), out)?;
    Ok(())
}

#[tokio::test]
async fn a_model_deployment_naming_an_http_mirror_is_fetched_against_its_manifest_sized_and_served()
-> Result<()> {
    let _fleet = FleetLock::acquire()?;
    install_crds().await?;
    let client = copyhold_e2e::client().await?;
    let ns = TestNamespace::create("mirror")?;
    let node_bin = workspace_bin("copyhold-node", "copyhold-node")?;
    // A plain directory with its manifest, served over HTTP (the local
    // hub serves each repository as a plain directory under
    // /OWNER/NAME/resolve/main/; nothing of the Hub's API is asked).
    let work = std::env::temp_dir().join(format!("copyhold-e2e-mirror-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let dir = work.join("www").join(REPO);
    std::fs::create_dir_all(&dir)?;
    for e in std::fs::read_dir(fixtures().join("tiny-llama"))? {
        let e = e?;
        std::fs::copy(e.path(), dir.join(e.file_name()))?;
    }
    write_manifest(&dir)?;
    let (endpoint, hub) = spawn_local(&work.join("www"), HubOptions::default()).await?;
    let url = format!("{endpoint}/{REPO}/resolve/main");
    let _kubelet = copyhold_e2e::start_kubelet(
        std::path::Path::new(env!("CARGO_BIN_EXE_copyhold-kubelet")),
        &ns.name,
        "127.0.104",
        &node_bin,
        "e2e-mirror",
    )?;
    let _controller = controller(&ns.name, &work.join("node-cache"))?;
    let path = work.join("mirrored.yaml");
    std::fs::write(
        &path,
        format!(
            r#"apiVersion: copyhold.dev/v1alpha1
kind: ModelDeployment
metadata: {{name: mirrored}}
spec:
  model:
    source: {{http: {{url: "{url}"}}}}
    servedName: mirrored
  serving: {{contextLength: 256, maxConcurrentSequences: 2}}
  replicas: 1
"#
        ),
    )?;
    apply(&ns.name, &path).await?;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let md = ready(&mds, "mirrored").await?;
    let st = md.status.context("status")?;
    assert!(
        st.required_memory_bytes.unwrap_or(0) > 0,
        "sized from the mirror"
    );
    assert_eq!(st.download.context("download status")?.phase, "done");
    let body = answer(&client, &ns.name, "mirrored").await?;
    assert_eq!(body["usage"]["completion_tokens"], 4, "{body}");
    let log = hub.access_log();
    assert!(
        log.iter().any(|a| a.path.ends_with("/SHA256SUMS")),
        "the manifest was read: {log:?}"
    );
    assert!(
        log.iter().all(|a| !a.path.starts_with("/api/")),
        "a plain mirror is never asked the Hub's API: {log:?}"
    );
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

#[tokio::test]
async fn a_model_deployment_naming_a_missing_repo_gets_a_condition_naming_it() -> Result<()> {
    install_crds().await?;
    let client = copyhold_e2e::client().await?;
    let ns = TestNamespace::create("hub404")?;
    let work = std::env::temp_dir().join(format!("copyhold-e2e-hub404-{}", std::process::id()));
    std::fs::create_dir_all(work.join("hub"))?;
    let (endpoint, _hub) = spawn_local(&work.join("hub"), HubOptions::default()).await?;
    let _controller = controller(&ns.name, &work.join("node-cache"))?;
    let path = work.join("missing.yaml");
    std::fs::write(&path, manifest("missing", &endpoint))?;
    apply(&ns.name, &path).await?;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let c = eventually(Duration::from_secs(60), || async {
        let st = mds.get("missing").await?.status.context("no status")?;
        st.conditions
            .iter()
            .find(|c| c.type_ == "Placed" && c.status == "False")
            .cloned()
            .context("no Placed=False yet")
    })
    .await?;
    assert_eq!(c.reason, "HubNotFound", "{c:?}");
    assert!(
        c.message.contains(REPO) && c.message.contains("huggingFace.repo"),
        "{}",
        c.message
    );
    Ok(())
}
