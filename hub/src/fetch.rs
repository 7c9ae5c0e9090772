//! Fetch a model from the Hub (or a mirror speaking its protocol) into the
//! cache: resolve the revision to a commit, list the files the allow-list
//! takes, download what is missing in resumable chunks, verify every file
//! against the hash the Hub gives (LFS: sha256; small files: the git blob
//! id), and link the snapshot. Nothing unverified is ever linked.
//!
//! A plain HTTP mirror (a ModelDeployment's `http` source: a web server
//! serving the model directory) has no Hub API: its file list and hashes
//! come from a `SHA256SUMS` manifest in that directory (the format
//! `sha256sum` writes), and its "commit" is the manifest's own hash, so a
//! changed model is a new snapshot. See [`MANIFEST`].

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::{StreamExt as _, TryStreamExt as _};
use sha1::Digest as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::cache::{Cache, replace_symlink};
use crate::progress::Progress;

/// Files taken when the allow-list is empty: what an engine needs of a
/// safetensors checkpoint, and nothing else (no .bin, .pt, .onnx copies).
pub const DEFAULT_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "*.safetensors",
    "model.safetensors.index.json",
];

/// The manifest a plain HTTP mirror serves beside the model's files:
/// `<sha256 hex>  <path>` a line, as `sha256sum * > SHA256SUMS` writes it.
pub const MANIFEST: &str = "SHA256SUMS";

/// The cache's name (`mirror/<host>--<last path part>-<hash>`) of the model
/// a plain HTTP mirror serves at `url`: one cache entry per URL, readable in
/// `ls`, and a valid `OWNER/NAME` for the cache's layout.
pub fn mirror_repo_id(url: &str) -> String {
    let url = url.trim_end_matches('/');
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' {
                    c
                } else {
                    '-'
                }
            })
            .collect::<String>()
            .trim_start_matches(['.', '-'])
            .to_string()
    };
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let host = clean(rest.split('/').next().unwrap_or(""));
    let last = clean(rest.rsplit('/').next().unwrap_or(""));
    let digest = sha2::Sha256::digest(url.as_bytes());
    let tag: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
    format!("mirror/{host}--{last}-{tag}")
}

/// What to fetch, from where, into which cache.
#[derive(Debug, Clone)]
pub struct FetchRequest {
    /// The Hub's base URL (`https://huggingface.co`, a mirror, a test hub).
    pub endpoint: String,
    /// `owner/name`.
    pub repo: String,
    /// Branch, tag or commit.
    pub revision: String,
    /// Glob allow-list over repo paths; empty: [`DEFAULT_FILES`].
    pub files: Vec<String>,
    pub token: Option<String>,
    pub cache: PathBuf,
    /// Bytes per ranged request; larger files download in parallel chunks.
    pub chunk_bytes: u64,
    /// Chunks in flight at once.
    pub parallel: usize,
    /// Where to keep the progress JSON.
    pub progress_file: Option<PathBuf>,
    /// Evict down to this many bytes of blobs after fetching.
    pub max_cache_bytes: Option<u64>,
    /// Models in use, never evicted (repo ids, or `repo@commit`).
    pub in_use: Vec<String>,
    /// A plain HTTP mirror's directory URL: files and hashes from its
    /// [`MANIFEST`] instead of the Hub's API; `repo` is then
    /// [`mirror_repo_id`] of it and `revision` is `main`.
    pub mirror: Option<String>,
}

impl FetchRequest {
    /// A request with the defaults: 64 MiB chunks, 4 at once.
    pub fn new(endpoint: &str, repo: &str, revision: &str, cache: &Path) -> Self {
        Self {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            repo: repo.to_string(),
            revision: revision.to_string(),
            files: Vec::new(),
            token: None,
            cache: cache.to_path_buf(),
            chunk_bytes: 64 << 20,
            parallel: 4,
            progress_file: None,
            max_cache_bytes: None,
            in_use: Vec::new(),
            mirror: None,
        }
    }

    /// A request for the model a plain HTTP mirror serves at `url`.
    pub fn from_mirror(url: &str, cache: &Path) -> Self {
        let url = url.trim_end_matches('/');
        Self {
            mirror: Some(url.to_string()),
            ..Self::new(url, &mirror_repo_id(url), "main", cache)
        }
    }
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(
        "{repo}: the hub at {endpoint} refused access (HTTP {status}{code}): the repository is gated or private; give a Hugging Face token with access to it (spec.model.huggingFace.tokenSecret names a Secret whose key `token` holds it; for copyhold-node fetch: --token-file or HF_TOKEN)"
    )]
    Unauthorized {
        repo: String,
        endpoint: String,
        status: u16,
        code: String,
    },
    #[error(
        "{repo}@{revision}: not found on {endpoint} (HTTP 404{code}): check spec.model.huggingFace.repo and revision (a private repository without a token also answers 404)"
    )]
    NotFound {
        repo: String,
        revision: String,
        endpoint: String,
        code: String,
    },
    #[error("GET {url}: HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("GET {url}: {message}")]
    Transport { url: String, message: String },
    #[error("{url}: {message}")]
    Protocol { url: String, message: String },
    #[error(
        "{file}: downloaded twice and both times its {kind} was {got}, not the hub's {want}; it is not served"
    )]
    Corrupt {
        file: String,
        kind: &'static str,
        got: String,
        want: String,
    },
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    #[error("no file of {repo}@{commit} matches {patterns:?}")]
    NoFiles {
        repo: String,
        commit: String,
        patterns: Vec<String>,
    },
    #[error(
        "{url}: not found (HTTP 404): a plain HTTP mirror must serve a SHA256SUMS manifest beside the model's files (`sha256sum * > SHA256SUMS` in the model directory), or serve the Hub's protocol (copyhold models serve) and be named as huggingFace.endpoint"
    )]
    NoManifest { url: String },
    #[error("{0}")]
    BadRequest(String),
}

impl FetchError {
    /// The condition reason the controller shows.
    pub fn reason(&self) -> &'static str {
        match self {
            FetchError::Unauthorized { .. } => "HubUnauthorized",
            FetchError::NotFound { .. } => "HubNotFound",
            FetchError::NoManifest { .. } => "MirrorWithoutManifest",
            FetchError::Corrupt { .. } => "DownloadCorrupt",
            _ => "DownloadFailed",
        }
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> FetchError + '_ {
    move |e| FetchError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// One file to fetch, as the hub's tree lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub path: String,
    pub size: u64,
    /// Git blob id.
    pub oid: String,
    pub lfs_sha256: Option<String>,
}

impl Wanted {
    /// The blob's name in the cache: its content hash.
    pub fn blob_id(&self) -> String {
        match &self.lfs_sha256 {
            Some(sha) => format!("sha256-{sha}"),
            None => format!("git-{}", self.oid),
        }
    }
}

/// What a fetch produced.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub commit: String,
    /// `CACHE/models/…/revisions/<rev>`: the directory to serve.
    pub dir: PathBuf,
    pub files: Vec<Wanted>,
    /// Bytes that came over the network in this fetch.
    pub downloaded: u64,
}

/// The HTTP side of a fetch.
struct Hub<'a> {
    client: &'a reqwest::Client,
    req: &'a FetchRequest,
}

impl Hub<'_> {
    fn get(&self, url: &str) -> reqwest::RequestBuilder {
        let b = self.client.get(url);
        match &self.req.token {
            Some(t) => b.bearer_auth(t),
            None => b,
        }
    }

    /// The error for a non-success answer about the repo.
    fn refusal(&self, url: &str, resp: &reqwest::Response) -> FetchError {
        let status = resp.status().as_u16();
        let code = resp
            .headers()
            .get("x-error-code")
            .and_then(|v| v.to_str().ok())
            .map(|c| format!(", {c}"))
            .unwrap_or_default();
        let (repo, endpoint) = (self.req.repo.clone(), self.req.endpoint.clone());
        match status {
            401 | 403 => FetchError::Unauthorized {
                repo,
                endpoint,
                status,
                code,
            },
            404 => FetchError::NotFound {
                repo,
                revision: self.req.revision.clone(),
                endpoint,
                code,
            },
            _ => FetchError::Status {
                url: url.to_string(),
                status,
            },
        }
    }

    async fn json(&self, url: &str) -> Result<serde_json::Value, FetchError> {
        let transport = |e: reqwest::Error| FetchError::Transport {
            url: url.to_string(),
            message: e.to_string(),
        };
        let resp = self
            .get(url)
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .map_err(transport)?;
        if !resp.status().is_success() {
            return Err(self.refusal(url, &resp));
        }
        resp.json().await.map_err(transport)
    }

    /// The revision's commit.
    async fn resolve(&self) -> Result<String, FetchError> {
        if let Some(base) = &self.req.mirror {
            let text = self.manifest(base).await?;
            let digest = sha2::Sha256::digest(text.as_bytes());
            return Ok(digest.iter().take(20).map(|b| format!("{b:02x}")).collect());
        }
        let url = format!(
            "{}/api/models/{}/revision/{}",
            self.req.endpoint, self.req.repo, self.req.revision
        );
        let v = self.json(&url).await?;
        v.get("sha")
            .and_then(|s| s.as_str())
            .filter(|s| is_hex(s))
            .map(str::to_string)
            .ok_or_else(|| FetchError::Protocol {
                url,
                message: "no commit `sha` in the model info".into(),
            })
    }

    /// A plain mirror's manifest, as text.
    async fn manifest(&self, base: &str) -> Result<String, FetchError> {
        let url = format!("{base}/{MANIFEST}");
        let transport = |e: reqwest::Error| FetchError::Transport {
            url: url.clone(),
            message: e.to_string(),
        };
        let resp = self
            .get(&url)
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .map_err(transport)?;
        if resp.status().as_u16() == 404 {
            return Err(FetchError::NoManifest { url });
        }
        if !resp.status().is_success() {
            return Err(self.refusal(&url, &resp));
        }
        resp.text().await.map_err(transport)
    }

    /// A plain mirror's files that the allow-list takes, with their sizes
    /// (from `HEAD`) and the manifest's sha256.
    async fn list_mirror(&self, base: &str, commit: &str) -> Result<Vec<Wanted>, FetchError> {
        let manifest_url = format!("{base}/{MANIFEST}");
        let entries = parse_manifest(&self.manifest(base).await?).map_err(|message| {
            FetchError::Protocol {
                url: manifest_url.clone(),
                message,
            }
        })?;
        let patterns = patterns(&self.req.files)?;
        let mut out = Vec::new();
        for (sha, path) in entries {
            if !(crate::repo::is_plain_path(&path) && matches_any(&patterns, &path)) {
                continue;
            }
            let size = self.size(&format!("{base}/{path}")).await?;
            out.push(Wanted {
                path,
                size,
                oid: sha.clone(),
                lfs_sha256: Some(sha),
            });
        }
        if out.is_empty() {
            return Err(FetchError::NoFiles {
                repo: self.req.repo.clone(),
                commit: commit.to_string(),
                patterns: patterns.iter().map(|p| p.as_str().to_string()).collect(),
            });
        }
        Ok(out)
    }

    /// A file's size, from a `HEAD` (redirects followed).
    async fn size(&self, url: &str) -> Result<u64, FetchError> {
        let resp = self
            .client
            .head(url)
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .map_err(|e| FetchError::Transport {
                url: url.to_string(),
                message: e.to_string(),
            })?;
        if !resp.status().is_success() {
            return Err(self.refusal(url, &resp));
        }
        resp.headers()
            .get(reqwest::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| FetchError::Protocol {
                url: url.to_string(),
                message: "no Content-Length".into(),
            })
    }

    /// The commit's files that the allow-list takes.
    async fn list(&self, commit: &str) -> Result<Vec<Wanted>, FetchError> {
        if let Some(base) = &self.req.mirror {
            return self.list_mirror(base, commit).await;
        }
        let url = format!(
            "{}/api/models/{}/tree/{commit}?recursive=true",
            self.req.endpoint, self.req.repo
        );
        let v = self.json(&url).await?;
        let entries = v.as_array().ok_or_else(|| FetchError::Protocol {
            url: url.clone(),
            message: "the tree is not a list".into(),
        })?;
        let patterns = patterns(&self.req.files)?;
        let mut out = Vec::new();
        for e in entries {
            if e.get("type").and_then(|t| t.as_str()) != Some("file") {
                continue;
            }
            let w = wanted(e).ok_or_else(|| FetchError::Protocol {
                url: url.clone(),
                message: format!("a tree entry lacks path, size or oid: {e}"),
            })?;
            if crate::repo::is_plain_path(&w.path) && matches_any(&patterns, &w.path) {
                out.push(w);
            }
        }
        if out.is_empty() {
            return Err(FetchError::NoFiles {
                repo: self.req.repo.clone(),
                commit: commit.to_string(),
                patterns: patterns.iter().map(|p| p.as_str().to_string()).collect(),
            });
        }
        Ok(out)
    }
}

/// `(sha256, path)` of each line of a `sha256sum` manifest (text or
/// binary mode, `*path`); blank lines and `#` comments are skipped.
pub fn parse_manifest(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || format!("line {}: not `<sha256>  <path>`: {line:?}", n + 1);
        let (sha, path) = line.split_once(char::is_whitespace).ok_or_else(bad)?;
        let path = path.trim_start().trim_start_matches('*');
        let path = path.strip_prefix("./").unwrap_or(path);
        if sha.len() != 64 || !is_hex(sha) || path.is_empty() {
            return Err(bad());
        }
        if path == MANIFEST {
            continue;
        }
        out.push((sha.to_ascii_lowercase(), path.to_string()));
    }
    Ok(out)
}

fn is_hex(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn wanted(e: &serde_json::Value) -> Option<Wanted> {
    let lfs_sha256 = match e.get("lfs") {
        Some(l) if !l.is_null() => Some(l.get("oid")?.as_str().filter(|s| is_hex(s))?.to_string()),
        _ => None,
    };
    Some(Wanted {
        path: e.get("path")?.as_str()?.to_string(),
        size: e.get("size")?.as_u64()?,
        oid: e.get("oid")?.as_str().filter(|s| is_hex(s))?.to_string(),
        lfs_sha256,
    })
}

fn patterns(files: &[String]) -> Result<Vec<glob::Pattern>, FetchError> {
    let given: Vec<String> = if files.is_empty() {
        DEFAULT_FILES.iter().map(|s| s.to_string()).collect()
    } else {
        files.to_vec()
    };
    given
        .iter()
        .map(|p| {
            glob::Pattern::new(p)
                .map_err(|e| FetchError::BadRequest(format!("file pattern `{p}`: {e}")))
        })
        .collect()
}

fn matches_any(patterns: &[glob::Pattern], path: &str) -> bool {
    let opts = glob::MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        require_literal_leading_dot: true,
    };
    patterns.iter().any(|p| p.matches_with(path, opts))
}

/// Hashes a file as the hub names it (sha256 for LFS, git blob id else).
async fn content_hash(path: &Path, w: &Wanted) -> std::io::Result<String> {
    let mut f = tokio::fs::File::open(path).await?;
    let len = f.metadata().await?.len();
    let mut sha = sha2::Sha256::new();
    let mut git = sha1::Sha1::new();
    git.update(format!("blob {len}\0").as_bytes());
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        if w.lfs_sha256.is_some() {
            sha.update(&buf[..n]);
        } else {
            git.update(&buf[..n]);
        }
    }
    Ok(if w.lfs_sha256.is_some() {
        format!("{:x}", sha.finalize())
    } else {
        format!("{:x}", git.finalize())
    })
}

fn expected(w: &Wanted) -> (&'static str, &str) {
    match &w.lfs_sha256 {
        Some(sha) => ("sha256", sha.as_str()),
        None => ("git blob id", w.oid.as_str()),
    }
}

/// One download: the shared pieces.
struct Job<'a> {
    hub: Hub<'a>,
    cache: Cache,
    commit: String,
    progress: Arc<Progress>,
    downloaded: std::sync::atomic::AtomicU64,
}

impl Job<'_> {
    fn url(&self, w: &Wanted) -> String {
        if let Some(base) = &self.hub.req.mirror {
            return format!("{base}/{}", w.path);
        }
        format!(
            "{}/{}/resolve/{}/{}",
            self.hub.req.endpoint, self.hub.req.repo, self.commit, w.path
        )
    }

    /// The file's verified blob: from the cache when its hash still
    /// matches, else downloaded (twice at most).
    async fn file(&self, w: &Wanted) -> Result<PathBuf, FetchError> {
        let blob = self.cache.blob(&w.blob_id());
        let (kind, want) = expected(w);
        if tokio::fs::try_exists(&blob).await.unwrap_or(false) {
            let got = content_hash(&blob, w).await.map_err(io_err(&blob))?;
            if got == want {
                self.progress.done.fetch_add(w.size, Ordering::Relaxed);
                self.progress.present.fetch_add(w.size, Ordering::Relaxed);
                return Ok(blob);
            }
            eprintln!(
                "fetch: {} in the cache has {kind} {got}, not {want}: fetching it again",
                w.path
            );
            remove_blob(&blob).await.map_err(io_err(&blob))?;
        }
        let mut last = None;
        for _attempt in 0..2 {
            self.chunks(w).await?;
            let tmp = self.assemble(w).await?;
            let got = content_hash(&tmp, w).await.map_err(io_err(&tmp))?;
            if got == want {
                if let Some(dir) = blob.parent() {
                    tokio::fs::create_dir_all(dir).await.map_err(io_err(dir))?;
                }
                set_read_only(&tmp).await.map_err(io_err(&tmp))?;
                tokio::fs::rename(&tmp, &blob)
                    .await
                    .map_err(io_err(&blob))?;
                let parts = self.cache.partial(&w.blob_id());
                let _ = tokio::fs::remove_dir_all(&parts).await;
                return Ok(blob);
            }
            eprintln!(
                "fetch: {} downloaded with {kind} {got}, not {want}: discarded, fetching again",
                w.path
            );
            let _ = tokio::fs::remove_file(&tmp).await;
            let _ = tokio::fs::remove_dir_all(self.cache.partial(&w.blob_id())).await;
            self.progress.done.fetch_sub(w.size, Ordering::Relaxed);
            last = Some(got);
        }
        Err(FetchError::Corrupt {
            file: w.path.clone(),
            kind,
            got: last.unwrap_or_default(),
            want: want.to_string(),
        })
    }

    /// Downloads every chunk of the file not yet complete, side by side.
    async fn chunks(&self, w: &Wanted) -> Result<(), FetchError> {
        let dir = self.cache.partial(&w.blob_id());
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(io_err(&dir))?;
        let chunk = self.hub.req.chunk_bytes.max(1);
        let n = w.size.div_ceil(chunk).max(1);
        futures::stream::iter(0..n)
            .map(|k| {
                let start = k * chunk;
                let end = (start + chunk).min(w.size);
                self.chunk(w, dir.join(k.to_string()), start, end)
            })
            .buffer_unordered(self.hub.req.parallel.max(1))
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// Bytes `start..end` of the file into `part`, resuming from what the
    /// part already holds.
    async fn chunk(
        &self,
        w: &Wanted,
        part: PathBuf,
        start: u64,
        end: u64,
    ) -> Result<(), FetchError> {
        let want = end - start;
        let mut have = tokio::fs::metadata(&part)
            .await
            .map(|m| m.len())
            .unwrap_or(0);
        if have > want {
            tokio::fs::remove_file(&part).await.map_err(io_err(&part))?;
            have = 0;
        }
        self.progress.done.fetch_add(have, Ordering::Relaxed);
        self.progress.present.fetch_add(have, Ordering::Relaxed);
        if want == 0 {
            tokio::fs::File::create(&part)
                .await
                .map_err(io_err(&part))?;
            return Ok(());
        }
        if have == want {
            return Ok(());
        }
        let url = self.url(w);
        let transport = |e: reqwest::Error| FetchError::Transport {
            url: url.clone(),
            message: e.to_string(),
        };
        let from = start + have;
        let mut resp = self
            .hub
            .get(&url)
            .header(reqwest::header::RANGE, format!("bytes={from}-{}", end - 1))
            .send()
            .await
            .map_err(transport)?;
        match resp.status() {
            reqwest::StatusCode::PARTIAL_CONTENT => {}
            reqwest::StatusCode::OK if from == 0 && end == w.size => {}
            s if s.is_success() => {
                return Err(FetchError::Protocol {
                    url,
                    message: format!("asked for bytes {from}-{} and got HTTP {s}", end - 1),
                });
            }
            _ => return Err(self.hub.refusal(&url, &resp)),
        }
        let mut f = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&part)
            .await
            .map_err(io_err(&part))?;
        let mut left = want - have;
        while left > 0 {
            let Some(bytes) = resp.chunk().await.map_err(transport)? else {
                break;
            };
            let take = bytes.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            f.write_all(&bytes[..take]).await.map_err(io_err(&part))?;
            left -= take as u64;
            self.progress.done.fetch_add(take as u64, Ordering::Relaxed);
            self.downloaded.fetch_add(take as u64, Ordering::Relaxed);
        }
        f.flush().await.map_err(io_err(&part))?;
        if left > 0 {
            return Err(FetchError::Transport {
                url,
                message: format!(
                    "the body ended {left} bytes early (kept; the next fetch resumes)"
                ),
            });
        }
        Ok(())
    }

    /// The chunks joined into one file next to the blobs (same filesystem:
    /// the rename into place is atomic).
    async fn assemble(&self, w: &Wanted) -> Result<PathBuf, FetchError> {
        let dir = self.cache.partial(&w.blob_id());
        let tmp = self.cache.root.join("blobs").join(format!(
            ".{}.tmp-{}-{}",
            w.blob_id(),
            std::process::id(),
            unique()
        ));
        if let Some(d) = tmp.parent() {
            tokio::fs::create_dir_all(d).await.map_err(io_err(d))?;
        }
        let mut out = tokio::fs::File::create(&tmp).await.map_err(io_err(&tmp))?;
        let n = w.size.div_ceil(self.hub.req.chunk_bytes.max(1)).max(1);
        for k in 0..n {
            let part = dir.join(k.to_string());
            let mut f = tokio::fs::File::open(&part).await.map_err(io_err(&part))?;
            tokio::io::copy(&mut f, &mut out)
                .await
                .map_err(io_err(&tmp))?;
        }
        out.sync_all().await.map_err(io_err(&tmp))?;
        Ok(tmp)
    }
}

/// A number no other call in this process gets (temporary file names).
fn unique() -> u64 {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

async fn remove_blob(blob: &Path) -> std::io::Result<()> {
    tokio::fs::remove_file(blob).await
}

async fn set_read_only(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    tokio::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444)).await
}

/// The relative link from `snapshots/<commit>/<path>` to its blob.
fn link_target(path: &str, blob_id: &str) -> PathBuf {
    // snapshots/<commit>/<path…> is 4 + depth levels under the cache root.
    let depth = path.matches('/').count() + 4;
    let mut t = PathBuf::new();
    for _ in 0..depth {
        t.push("..");
    }
    t.join("blobs").join(blob_id)
}

fn check_request(req: &FetchRequest) -> Result<(), FetchError> {
    let plain = |s: &str| {
        !s.is_empty()
            && !s.starts_with('.')
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    };
    let parts: Vec<&str> = req.repo.split('/').collect();
    if parts.len() != 2 || !parts.iter().all(|p| plain(p)) {
        return Err(FetchError::BadRequest(format!(
            "repo `{}` is not OWNER/NAME",
            req.repo
        )));
    }
    if !plain(&req.revision) {
        return Err(FetchError::BadRequest(format!(
            "revision `{}` must be a branch, tag or commit of letters, digits, `.`, `_`, `-`",
            req.revision
        )));
    }
    Ok(())
}

/// Fetches `req.repo@req.revision` into the cache (see the module doc).
pub async fn fetch(client: &reqwest::Client, req: &FetchRequest) -> Result<Fetched, FetchError> {
    fetch_with(
        client,
        req,
        Progress::new(&req.repo, req.progress_file.clone()),
    )
    .await
}

/// [`fetch`], counting into `progress` (which others may be serving).
pub async fn fetch_with(
    client: &reqwest::Client,
    req: &FetchRequest,
    progress: Arc<Progress>,
) -> Result<Fetched, FetchError> {
    check_request(req)?;
    let cache = Cache::new(&req.cache);
    progress.publish("resolving", None);
    let result = fetch_inner(client, req, &cache, &progress).await;
    if let Ok(f) = &result {
        // Blobs found in the cache: the whole model is there.
        progress
            .done
            .store(f.files.iter().map(|w| w.size).sum(), Ordering::Relaxed);
    }
    match &result {
        Ok(f) => progress.publish(
            "done",
            Some(format!(
                "{} files, {} bytes downloaded, commit {}",
                f.files.len(),
                f.downloaded,
                f.commit
            )),
        ),
        Err(e) => progress.publish("failed", Some(e.to_string())),
    }
    result
}

async fn fetch_inner(
    client: &reqwest::Client,
    req: &FetchRequest,
    cache: &Cache,
    progress: &Arc<Progress>,
) -> Result<Fetched, FetchError> {
    let hub = Hub { client, req };
    let commit = hub.resolve().await?;
    *progress.commit.lock().unwrap_or_else(|p| p.into_inner()) = Some(commit.clone());
    let files = hub.list(&commit).await?;
    progress
        .total
        .store(files.iter().map(|f| f.size).sum(), Ordering::Relaxed);
    let root = &req.cache;
    let _shared = cache.lock_shared().await.map_err(io_err(root))?;
    let _model = cache
        .lock_model(&req.repo, || {
            eprintln!("fetch: another fetcher holds {}; waiting for it", req.repo)
        })
        .await
        .map_err(io_err(root))?;
    let job = Job {
        hub,
        cache: cache.clone(),
        commit: commit.clone(),
        progress: progress.clone(),
        downloaded: 0.into(),
    };
    let ticker = progress.tick(Duration::from_secs(1));
    let mut blobs = Vec::with_capacity(files.len());
    for w in &files {
        match job.file(w).await {
            Ok(b) => blobs.push(b),
            Err(e) => {
                ticker.abort();
                return Err(e);
            }
        }
    }
    ticker.abort();
    progress.publish("verifying", None);
    let snapshot = cache.snapshot(&req.repo, &commit);
    for w in &files {
        let link = snapshot.join(&w.path);
        replace_symlink(&link_target(&w.path, &w.blob_id()), &link).map_err(io_err(&link))?;
    }
    let dir = cache.revision(&req.repo, &req.revision);
    replace_symlink(&PathBuf::from("../snapshots").join(&commit), &dir).map_err(io_err(&dir))?;
    cache.touch(&req.repo, &commit).map_err(io_err(root))?;
    let downloaded = job.downloaded.load(Ordering::Relaxed);
    drop(_model);
    drop(_shared);
    if let Some(limit) = req.max_cache_bytes {
        let mut in_use: HashSet<String> = req
            .in_use
            .iter()
            .map(|r| crate::cache::repo_key(r))
            .collect();
        in_use.insert(crate::cache::repo_key(&req.repo));
        let removed = cache.evict(limit, &in_use).map_err(io_err(root))?;
        for r in removed {
            eprintln!("fetch: evicted {r} (least recently used, not in use)");
        }
    }
    Ok(Fetched {
        commit,
        dir,
        files,
        downloaded,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_allow_list_takes_the_engines_files_only() {
        let p = patterns(&[]).unwrap();
        for yes in [
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "model.safetensors",
            "model-00001-of-00002.safetensors",
            "model.safetensors.index.json",
            "generation_config.json",
        ] {
            assert!(matches_any(&p, yes), "{yes}");
        }
        for no in [
            "pytorch_model.bin",
            "README.md",
            "sub/model.safetensors",
            "model.gguf",
        ] {
            assert!(!matches_any(&p, no), "{no}");
        }
        let gguf = patterns(&["tiny-q4_0.gguf".into()]).unwrap();
        assert!(matches_any(&gguf, "tiny-q4_0.gguf"));
        assert!(!matches_any(&gguf, "config.json"));
    }

    #[test]
    fn snapshot_links_climb_to_the_cache_root() {
        assert_eq!(
            link_target("config.json", "git-ab"),
            PathBuf::from("../../../../blobs/git-ab")
        );
        assert_eq!(
            link_target("sub/x.safetensors", "sha256-cd"),
            PathBuf::from("../../../../../blobs/sha256-cd")
        );
    }

    #[test]
    fn repos_and_revisions_from_outside_are_checked() {
        let ok = FetchRequest::new("http://h", "town/tiny", "main", Path::new("/c"));
        assert!(check_request(&ok).is_ok());
        for (repo, rev) in [
            ("tiny", "main"),
            ("../x/y", "main"),
            ("a/b/c", "main"),
            ("a/b", "../x"),
            ("a/b", ""),
        ] {
            let r = FetchRequest::new("http://h", repo, rev, Path::new("/c"));
            assert!(check_request(&r).is_err(), "{repo}@{rev}");
        }
    }

    #[test]
    fn a_mirror_url_names_a_valid_cache_entry_of_its_own() {
        let a = mirror_repo_id("http://10.0.0.5:8080/models/qwen2.5-0.5b/");
        let b = mirror_repo_id("http://10.0.0.5:8080/models/qwen2.5-0.5b-v2");
        assert!(a.starts_with("mirror/10.0.0.5-8080--qwen2.5-0.5b-"), "{a}");
        assert_ne!(a, b);
        for url in [
            "http://h",
            "https://a.b/.x/",
            "http://h/%2e%2e/..",
            "http://[::1]:80/m",
        ] {
            let r = FetchRequest::from_mirror(url, Path::new("/c"));
            assert!(check_request(&r).is_ok(), "{url} -> {}", r.repo);
        }
    }

    #[test]
    fn manifests_are_read_as_sha256sum_writes_them_and_bad_lines_name_their_number() {
        let sha = "ab".repeat(32);
        let text = format!(
            "# made by sha256sum\n{sha}  config.json\n{sha} *model.safetensors\n{sha}  ./SHA256SUMS\n\n"
        );
        let got = parse_manifest(&text).expect("parses");
        assert_eq!(
            got,
            vec![
                (sha.clone(), "config.json".to_string()),
                (sha.clone(), "model.safetensors".to_string())
            ]
        );
        let err = parse_manifest(&format!("{sha}  a\nnot-a-hash  b\n")).unwrap_err();
        assert!(err.starts_with("line 2"), "{err}");
    }
}
