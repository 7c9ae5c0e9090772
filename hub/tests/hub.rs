//! The local hub against the official `huggingface_hub` client, and the
//! fetcher against the local hub: real HTTP on loopback, real files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use copyhold_hub::fetch::{FetchError, FetchRequest, fetch};
use copyhold_hub::server::{Access, HubOptions, spawn_local};

const REPO: &str = "town/tiny-llama";

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-llama")
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "copyhold-hub-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        make_writable(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn make_writable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if let Ok(m) = std::fs::symlink_metadata(&p) {
                if m.is_dir() {
                    make_writable(&p);
                } else if m.is_file() {
                    let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644));
                }
            }
        }
    }
}

/// A hub root holding the fixture as `town/tiny-llama` (and any `extra`
/// repos, each a copy too).
fn hub_root(repos: &[&str]) -> TempDir {
    let root = TempDir::new("root");
    for repo in repos {
        let dir = root.0.join(repo);
        std::fs::create_dir_all(&dir).unwrap();
        for e in std::fs::read_dir(fixture()).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
    }
    root
}

fn fixture_files() -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(fixture())
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// A Python with the official `huggingface_hub`, in the cache's venv.
/// Made under a file lock: the tests run as parallel processes, and on a
/// fresh machine two of them would otherwise build the venv at once.
fn hf_python() -> PathBuf {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let venv = PathBuf::from(home).join(".cache/copyhold/venv-hf");
    std::fs::create_dir_all(venv.parent().unwrap()).unwrap();
    let lock = std::fs::File::create(venv.with_extension("lock")).unwrap();
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).unwrap();
    let py = venv.join("bin/python");
    let ok = Command::new(&py)
        .args(["-c", "import huggingface_hub"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            Command::new("python3")
                .args(["-m", "venv"])
                .arg(&venv)
                .status()
                .unwrap()
                .success()
        );
        assert!(
            Command::new(venv.join("bin/pip"))
                .args(["install", "-q", "huggingface_hub"])
                .status()
                .unwrap()
                .success(),
            "pip install huggingface_hub"
        );
    }
    py
}

/// Runs `code` with the official client pointed at `endpoint`; its stdout,
/// or its stderr as the error.
fn python(endpoint: &str, cache: &Path, code: &str) -> Result<String, String> {
    let out = Command::new(hf_python())
        .args(["-c", code])
        .env("HF_ENDPOINT", endpoint)
        .env("HF_HOME", cache)
        .env("HF_HUB_DISABLE_TELEMETRY", "1")
        .env("NO_PROXY", "127.0.0.1")
        .env_remove("HF_TOKEN")
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn read_tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            (!name.starts_with('.')).then(|| (name, std::fs::read(e.path()).unwrap()))
        })
        .collect()
}

fn lfs_gets(log: &[Access]) -> Vec<Access> {
    log.iter()
        .filter(|a| a.method == "GET" && a.path.starts_with("/lfs/"))
        .cloned()
        .collect()
}

#[tokio::test]
async fn the_official_huggingface_hub_client_downloads_the_fixture_unchanged() {
    let root = hub_root(&[REPO]);
    let (url, hub) = spawn_local(&root.0, HubOptions::default()).await.unwrap();
    let cache = TempDir::new("hf-cache");
    let code = format!(
        "from huggingface_hub import snapshot_download\nprint(snapshot_download('{REPO}', revision='main'))"
    );
    let c = cache.0.clone();
    let u = url.clone();
    let dir = tokio::task::spawn_blocking(move || python(&u, &c, &code))
        .await
        .unwrap()
        .expect("snapshot_download");
    assert_eq!(read_tree(Path::new(&dir)), fixture_files());
    let log = hub.access_log();
    // The client resolved the revision, listed the tree, asked for each file
    // with HEAD, followed the LFS redirect to the content URL.
    assert!(
        log.iter()
            .any(|a| a.path == format!("/api/models/{REPO}/revision/main") && a.status == 200),
        "{log:?}"
    );
    assert!(
        log.iter().any(|a| a.method == "HEAD"
            && a.path.starts_with(&format!("/{REPO}/resolve/"))
            && a.path.ends_with("/model.safetensors")
            && a.status == 302),
        "{log:?}"
    );
    assert_eq!(lfs_gets(&log).len(), 1, "{log:?}");
}

#[tokio::test]
async fn the_official_client_is_refused_a_gated_repo_without_its_token_and_served_with_it() {
    let root = hub_root(&["town/gated"]);
    let options = HubOptions {
        gated: BTreeMap::from([("town/gated".into(), "hf_secret".into())]),
        ..HubOptions::default()
    };
    let (url, _hub) = spawn_local(&root.0, options).await.unwrap();
    let cache = TempDir::new("hf-gated");
    let (u, c) = (url.clone(), cache.0.clone());
    let refused = tokio::task::spawn_blocking(move || {
        python(
            &u,
            &c,
            "from huggingface_hub import hf_hub_download\nprint(hf_hub_download('town/gated', 'config.json'))",
        )
    })
    .await
    .unwrap()
    .expect_err("no token");
    assert!(refused.contains("GatedRepoError"), "{refused}");
    let (u, c) = (url.clone(), cache.0.clone());
    let path = tokio::task::spawn_blocking(move || {
        python(
            &u,
            &c,
            "from huggingface_hub import hf_hub_download\nprint(hf_hub_download('town/gated', 'config.json', token='hf_secret'))",
        )
    })
    .await
    .unwrap()
    .expect("with the token");
    assert_eq!(
        std::fs::read(path).unwrap(),
        std::fs::read(fixture().join("config.json")).unwrap()
    );
}

fn request(url: &str, cache: &Path) -> FetchRequest {
    let mut r = FetchRequest::new(url, REPO, "main", cache);
    r.chunk_bytes = 256 * 1024;
    r
}

#[tokio::test]
async fn a_fetch_verifies_into_the_cache_in_parallel_chunks_and_a_second_downloads_nothing() {
    let root = hub_root(&[REPO]);
    let (url, hub) = spawn_local(&root.0, HubOptions::default()).await.unwrap();
    let cache = TempDir::new("cache");
    let progress = cache.0.join("progress.json");
    let mut req = request(&url, &cache.0);
    req.progress_file = Some(progress.clone());
    let got = fetch(&client(), &req).await.unwrap();
    let mut want = fixture_files();
    want.remove("golden.json"); // not in the default allow-list
    assert_eq!(read_tree(&got.dir), want);
    let size = std::fs::metadata(fixture().join("model.safetensors"))
        .unwrap()
        .len();
    let lfs = lfs_gets(&hub.access_log());
    assert_eq!(lfs.len() as u64, size.div_ceil(256 * 1024), "{lfs:?}");
    assert!(
        lfs.iter().all(|a| a.status == 206 && a.range.is_some()),
        "{lfs:?}"
    );
    let report: copyhold_hub::progress::ProgressReport =
        serde_json::from_slice(&std::fs::read(&progress).unwrap()).unwrap();
    assert_eq!(report.phase, "done");
    assert_eq!(report.bytes_done, report.bytes_total);
    assert_eq!(report.commit.as_deref(), Some(got.commit.as_str()));

    let before = hub.access_log().len();
    let again = fetch(&client(), &req).await.unwrap();
    assert_eq!(again.downloaded, 0);
    let after: Vec<_> = hub.access_log()[before..].to_vec();
    assert!(
        after.iter().all(|a| a.path.starts_with("/api/")),
        "only the revision and the tree are asked again: {after:?}"
    );
}

#[tokio::test]
async fn a_download_cut_mid_file_resumes_where_it_stopped() {
    let root = hub_root(&[REPO]);
    let options = HubOptions {
        cut_first_download_after: Some(100_000),
        ..HubOptions::default()
    };
    let (url, hub) = spawn_local(&root.0, options).await.unwrap();
    let cache = TempDir::new("cut");
    let mut req = request(&url, &cache.0);
    req.chunk_bytes = 1 << 30; // one chunk: the cut is mid-file
    let e = fetch(&client(), &req).await.unwrap_err();
    assert!(matches!(e, FetchError::Transport { .. }), "{e}");
    assert!(
        !cache
            .0
            .join("models")
            .join("town--tiny-llama")
            .join("revisions")
            .exists(),
        "nothing is linked for serving"
    );
    let got = fetch(&client(), &req).await.unwrap();
    assert_eq!(
        std::fs::read(got.dir.join("model.safetensors")).unwrap(),
        std::fs::read(fixture().join("model.safetensors")).unwrap()
    );
    let lfs = lfs_gets(&hub.access_log());
    assert_eq!(lfs.len(), 2, "{lfs:?}");
    let resumed_from: u64 = lfs[1]
        .range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split('-').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(resumed_from > 0, "the second request resumed: {lfs:?}");
    let size = std::fs::metadata(fixture().join("model.safetensors"))
        .unwrap()
        .len();
    assert_eq!(resumed_from, 100_000, "exactly where the cut was");
    assert_eq!(
        lfs[1].range.as_deref(),
        Some(format!("bytes={resumed_from}-{}", size - 1).as_str())
    );
}

#[tokio::test]
async fn a_flipped_byte_in_the_cache_is_fetched_again_not_served() {
    let root = hub_root(&[REPO]);
    let (url, hub) = spawn_local(&root.0, HubOptions::default()).await.unwrap();
    let cache = TempDir::new("flip");
    let req = request(&url, &cache.0);
    let got = fetch(&client(), &req).await.unwrap();
    let blob = std::fs::canonicalize(got.dir.join("model.safetensors")).unwrap();
    make_writable(blob.parent().unwrap());
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[5000] ^= 0x01;
    std::fs::write(&blob, &bytes).unwrap();
    let before = lfs_gets(&hub.access_log()).len();
    let again = fetch(&client(), &req).await.unwrap();
    assert!(
        lfs_gets(&hub.access_log()).len() > before,
        "downloaded again"
    );
    assert_eq!(
        std::fs::read(again.dir.join("model.safetensors")).unwrap(),
        std::fs::read(fixture().join("model.safetensors")).unwrap()
    );
}

#[tokio::test]
async fn a_gated_repo_without_a_token_is_a_401_naming_the_repo_and_the_token_secret() {
    let root = hub_root(&[REPO]);
    let options = HubOptions {
        gated: BTreeMap::from([(REPO.into(), "hf_secret".into())]),
        ..HubOptions::default()
    };
    let (url, _hub) = spawn_local(&root.0, options).await.unwrap();
    let cache = TempDir::new("gated");
    let mut req = request(&url, &cache.0);
    let e = fetch(&client(), &req).await.unwrap_err();
    assert_eq!(e.reason(), "HubUnauthorized");
    let msg = e.to_string();
    assert!(
        msg.contains(REPO) && msg.contains("401") && msg.contains("tokenSecret"),
        "{msg}"
    );
    req.token = Some("hf_secret".into());
    fetch(&client(), &req).await.unwrap();
}

#[tokio::test]
async fn an_unknown_repo_or_revision_is_a_404_naming_it() {
    let root = hub_root(&[REPO]);
    let (url, _hub) = spawn_local(&root.0, HubOptions::default()).await.unwrap();
    let cache = TempDir::new("404");
    let mut req = request(&url, &cache.0);
    req.repo = "town/nothing".into();
    let e = fetch(&client(), &req).await.unwrap_err();
    assert_eq!(e.reason(), "HubNotFound");
    assert!(
        e.to_string().contains("town/nothing@main") && e.to_string().contains("RepoNotFound"),
        "{e}"
    );
    let mut req = request(&url, &cache.0);
    req.revision = "v9".into();
    let e = fetch(&client(), &req).await.unwrap_err();
    assert!(e.to_string().contains("RevisionNotFound"), "{e}");
}

#[tokio::test]
async fn two_fetchers_of_one_model_download_it_once() {
    let root = hub_root(&[REPO]);
    let (url, hub) = spawn_local(&root.0, HubOptions::default()).await.unwrap();
    let cache = TempDir::new("twice");
    let req = request(&url, &cache.0);
    let c = client();
    let (a, b) = tokio::join!(fetch(&c, &req), fetch(&c, &req));
    let (a, b) = (a.unwrap(), b.unwrap());
    let size = std::fs::metadata(fixture().join("model.safetensors"))
        .unwrap()
        .len();
    assert_eq!(
        lfs_gets(&hub.access_log()).len() as u64,
        size.div_ceil(256 * 1024)
    );
    assert!(
        a.downloaded == 0 || b.downloaded == 0,
        "{} {}",
        a.downloaded,
        b.downloaded
    );
}

#[tokio::test]
async fn eviction_removes_the_least_recently_used_model_that_is_not_in_use() {
    let root = hub_root(&[REPO, "town/other", "town/third"]);
    let (url, _hub) = spawn_local(&root.0, HubOptions::default()).await.unwrap();
    let cache = TempDir::new("evict");
    let mut req = request(&url, &cache.0);
    let one = fetch(&client(), &req).await.unwrap();
    // The copies are identical, so they share blobs: "third" gets weights
    // of its own.
    std::fs::write(
        root.0.join("town/third/model.safetensors"),
        b"\x02\0\0\0\0\0\0\0{}",
    )
    .unwrap();
    let third_sha = copyhold_hub::repo::read_repo(&root.0.join("town/third"))
        .unwrap()
        .files
        .iter()
        .find_map(|f| f.lfs_sha256.clone())
        .unwrap();
    req.repo = "town/third".into();
    std::thread::sleep(std::time::Duration::from_millis(20));
    fetch(&client(), &req).await.unwrap();
    req.repo = "town/other".into();
    req.in_use = vec![REPO.into()];
    req.max_cache_bytes = Some(1);
    std::thread::sleep(std::time::Duration::from_millis(20));
    fetch(&client(), &req).await.unwrap();
    // tiny-llama is in use and "other" is being fetched: "third" goes.
    assert!(one.dir.join("model.safetensors").exists());
    assert!(
        !cache
            .0
            .join("models/town--third/snapshots")
            .read_dir()
            .unwrap()
            .any(|_| true)
    );
    assert!(
        !cache
            .0
            .join("blobs")
            .join(format!("sha256-{third_sha}"))
            .exists()
    );
    assert!(!cache.0.join("models/town--third/revisions/main").exists());
}

/// Writes `SHA256SUMS` into `dir` as `sha256sum *` would, with `wrong`
/// files given a hash that is not theirs.
fn write_manifest(dir: &Path, wrong: &[&str]) {
    use sha2::Digest as _;
    let mut lines = String::new();
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for name in names {
        let mut sha = format!(
            "{:x}",
            sha2::Sha256::digest(std::fs::read(dir.join(&name)).unwrap())
        );
        if wrong.contains(&name.as_str()) {
            sha = "0".repeat(64);
        }
        lines.push_str(&format!("{sha}  {name}\n"));
    }
    std::fs::write(dir.join(copyhold_hub::fetch::MANIFEST), lines).unwrap();
}

#[tokio::test]
async fn a_plain_http_mirror_is_fetched_against_its_manifest_and_a_second_fetch_downloads_nothing()
{
    let root = hub_root(&[REPO]);
    write_manifest(&root.0.join(REPO), &[]);
    let (url, hub) = spawn_local(&root.0, HubOptions::default()).await.unwrap();
    // The hub's resolve path serves the repository as a plain directory.
    let mirror = format!("{url}/{REPO}/resolve/main");
    let cache = TempDir::new("mirror");
    let mut req = FetchRequest::from_mirror(&mirror, &cache.0);
    req.chunk_bytes = 256 * 1024;
    let got = fetch(&client(), &req).await.unwrap();
    let mut want = fixture_files();
    want.remove("golden.json");
    assert_eq!(read_tree(&got.dir), want);
    assert!(got.downloaded > 0);
    assert!(
        hub.access_log()
            .iter()
            .all(|a| !a.path.starts_with("/api/")),
        "a plain mirror is never asked the Hub's API"
    );
    let again = fetch(&client(), &req).await.unwrap();
    assert_eq!(
        again.downloaded, 0,
        "verified blobs in the cache are reused"
    );
    assert_eq!(
        again.commit, got.commit,
        "the manifest's hash is the commit"
    );
}

#[tokio::test]
async fn a_mirror_file_that_differs_from_its_manifest_is_refused_and_never_linked() {
    let root = hub_root(&[REPO]);
    write_manifest(&root.0.join(REPO), &["model.safetensors"]);
    let (url, _hub) = spawn_local(&root.0, HubOptions::default()).await.unwrap();
    let cache = TempDir::new("mirror-bad");
    let req = FetchRequest::from_mirror(&format!("{url}/{REPO}/resolve/main"), &cache.0);
    let e = fetch(&client(), &req).await.unwrap_err();
    assert!(matches!(e, FetchError::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains("model.safetensors"), "{e}");
    let revisions = cache.0.join("models").join(req.repo.replace('/', "--"));
    assert!(
        !revisions.join("revisions").exists(),
        "nothing is linked for serving"
    );
}

#[tokio::test]
async fn a_mirror_without_a_manifest_is_refused_naming_the_fix() {
    let root = hub_root(&[REPO]);
    let (url, _hub) = spawn_local(&root.0, HubOptions::default()).await.unwrap();
    let cache = TempDir::new("mirror-none");
    let req = FetchRequest::from_mirror(&format!("{url}/{REPO}/resolve/main"), &cache.0);
    let e = fetch(&client(), &req).await.unwrap_err();
    assert!(matches!(e, FetchError::NoManifest { .. }), "{e}");
    assert!(e.to_string().contains("sha256sum"), "{e}");
    assert_eq!(e.reason(), "MirrorWithoutManifest");
}
