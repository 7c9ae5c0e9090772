//! The Hub's download protocol, served from a directory of repositories
//! (`ROOT/OWNER/NAME/…`): what `copyhold models serve` runs as an air-gapped
//! mirror, and what the tests run as a local Hub. The official
//! `huggingface_hub` client downloads from it unchanged (see the tests).
//!
//! - `GET /api/models/OWNER/NAME[/revision/REV]`: the model info, with
//!   `sha` (the commit) and `siblings`.
//! - `GET /api/models/OWNER/NAME/tree/REV[/PATH][?recursive=true]`: the
//!   files with size, git blob `oid` and `lfs: {oid (sha256), size}`.
//! - `HEAD|GET /OWNER/NAME/resolve/REV/FILE`: small files directly (`ETag`
//!   = git blob id); LFS files as a `302` to their content URL, carrying
//!   `X-Linked-Etag` (the sha256) and `X-Linked-Size`. Both carry
//!   `X-Repo-Commit`.
//! - `HEAD|GET /lfs/OWNER/NAME/SHA256`: the content, with `Range` (206).
//! - Errors as the Hub gives them: `X-Error-Code` (`RepoNotFound`,
//!   `RevisionNotFound`, `EntryNotFound`, `GatedRepo`) and a JSON
//!   `{"error": …}`; a gated repository answers 401 without its token.
//!
//! REV is `main` or the commit. Every request is recorded in an access log
//! (memory, and a file when asked): tests read it to see what was fetched.

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::StreamExt as _;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};

use crate::repo::{RepoFile, RepoSnapshot, is_plain_path, read_repo};

/// A file in a repository directory holding the commit to answer with (the
/// upstream Hub's, written by `copyhold models pull`), so that a revision
/// pinned to a commit resolves on the mirror too. Hidden: not served.
pub const COMMIT_FILE: &str = ".copyhold-commit";

/// How the hub behaves beyond the protocol.
#[derive(Debug, Clone, Default)]
pub struct HubOptions {
    /// Gated repositories (`OWNER/NAME`) and the bearer token each accepts.
    pub gated: BTreeMap<String, String>,
    /// Also append each request to this file.
    pub access_log: Option<PathBuf>,
    /// Tests: the first content download is cut after this many bytes (the
    /// connection drops mid-file, as a network or a killed process would).
    pub cut_first_download_after: Option<u64>,
    /// Tests and demos: send content at most this fast.
    pub bytes_per_sec: Option<u64>,
}

/// One request, as the access log records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    pub status: u16,
}

/// Stat of every file of a repo: when it is unchanged, so are the hashes.
type Stamp = Vec<(PathBuf, u64, Option<SystemTime>)>;

/// The hub's state.
pub struct Hub {
    root: PathBuf,
    options: HubOptions,
    log: Mutex<Vec<Access>>,
    scans: Mutex<HashMap<String, (Stamp, Arc<RepoSnapshot>)>>,
    cut_done: AtomicBool,
}

impl Hub {
    /// A hub serving the repositories under `root`.
    pub fn new(root: impl Into<PathBuf>, options: HubOptions) -> Arc<Self> {
        Arc::new(Self {
            root: root.into(),
            options,
            log: Mutex::default(),
            scans: Mutex::default(),
            cut_done: AtomicBool::new(false),
        })
    }

    /// Every request so far.
    pub fn access_log(&self) -> Vec<Access> {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn record(&self, a: Access) {
        if let Some(path) = &self.options.access_log {
            let line = format!(
                "{} {} range={} status={}\n",
                a.method,
                a.path,
                a.range.as_deref().unwrap_or("-"),
                a.status
            );
            let written = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut f| f.write_all(line.as_bytes()));
            if let Err(e) = written {
                tracing::warn!(error = %e, path = %path.display(), "access log");
            }
        }
        self.log.lock().unwrap_or_else(|p| p.into_inner()).push(a);
    }

    /// The repository's snapshot, hashed again only when a file changed.
    fn snapshot(&self, repo: &str) -> Result<Arc<RepoSnapshot>, Box<Response>> {
        let dir = self.root.join(repo);
        if !dir.is_dir() {
            return Err(refuse(
                StatusCode::NOT_FOUND,
                "RepoNotFound",
                &format!("Repository {repo} not found"),
            ));
        }
        let stamp = stamp(&dir).map_err(|e| Box::new(internal(&e)))?;
        let mut scans = self.scans.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((s, snap)) = scans.get(repo)
            && *s == stamp
        {
            return Ok(snap.clone());
        }
        let mut snap = read_repo(&dir).map_err(|e| Box::new(internal(&e)))?;
        if let Ok(c) = std::fs::read_to_string(dir.join(COMMIT_FILE)) {
            let c = c.trim();
            if c.len() == 40 && c.bytes().all(|b| b.is_ascii_hexdigit()) {
                snap.commit = c.to_string();
            }
        }
        let snap = Arc::new(snap);
        scans.insert(repo.to_string(), (stamp, snap.clone()));
        Ok(snap)
    }

    /// 401 for a gated repository without its token.
    fn authorize(&self, repo: &str, headers: &HeaderMap) -> Result<(), Box<Response>> {
        let Some(token) = self.options.gated.get(repo) else {
            return Ok(());
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given == Some(token.as_str()) {
            return Ok(());
        }
        Err(refuse(
            StatusCode::UNAUTHORIZED,
            "GatedRepo",
            &format!(
                "Access to model {repo} is restricted. You must have access to it and be authenticated to access it. Please log in."
            ),
        ))
    }

    /// Checks access, the repo and the revision.
    fn open(
        &self,
        repo: &str,
        rev: &str,
        headers: &HeaderMap,
    ) -> Result<Arc<RepoSnapshot>, Box<Response>> {
        if !is_plain_path(repo) {
            return Err(refuse(
                StatusCode::NOT_FOUND,
                "RepoNotFound",
                "bad repository id",
            ));
        }
        self.authorize(repo, headers)?;
        let snap = self.snapshot(repo)?;
        if rev != "main" && rev != snap.commit {
            return Err(refuse(
                StatusCode::NOT_FOUND,
                "RevisionNotFound",
                &format!("Invalid rev id: {rev}"),
            ));
        }
        Ok(snap)
    }
}

fn stamp(dir: &Path) -> std::io::Result<Stamp> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let m = std::fs::metadata(e.path())?;
            if m.is_dir() {
                stack.push(e.path());
            } else {
                out.push((e.path(), m.len(), m.modified().ok()));
            }
        }
    }
    out.sort();
    Ok(out)
}

fn hub_error(status: StatusCode, code: &str, message: &str) -> Response {
    let mut r = (status, axum::Json(json!({ "error": message }))).into_response();
    if let Ok(v) = HeaderValue::from_str(code) {
        r.headers_mut().insert("x-error-code", v);
    }
    if let Ok(v) = HeaderValue::from_str(message) {
        r.headers_mut().insert("x-error-message", v);
    }
    r
}

/// A refusal from the checks before serving (boxed: a `Response` is large).
fn refuse(status: StatusCode, code: &str, message: &str) -> Box<Response> {
    Box::new(hub_error(status, code, message))
}

fn internal(e: &std::io::Error) -> Response {
    hub_error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Internal",
        &e.to_string(),
    )
}

fn repo_id(owner: &str, name: &str) -> String {
    format!("{owner}/{name}")
}

fn file_json(f: &RepoFile) -> serde_json::Value {
    let mut v = json!({"type": "file", "path": f.path, "size": f.size, "oid": f.oid});
    if let Some(sha) = &f.lfs_sha256 {
        // pointerSize: the size of the git LFS pointer file the repo holds.
        v["lfs"] = json!({"oid": sha, "size": f.size, "pointerSize": 134});
    }
    v
}

fn info_json(repo: &str, snap: &RepoSnapshot, gated: bool) -> serde_json::Value {
    let siblings: Vec<_> = snap
        .files
        .iter()
        .map(|f| {
            let mut s = json!({"rfilename": f.path, "size": f.size, "blobId": f.oid});
            if let Some(sha) = &f.lfs_sha256 {
                s["lfs"] = json!({"sha256": sha, "size": f.size, "pointerSize": 134});
            }
            s
        })
        .collect();
    json!({
        "_id": snap.commit,
        "id": repo,
        "modelId": repo,
        "sha": snap.commit,
        "private": false,
        "gated": if gated { json!("manual") } else { json!(false) },
        "disabled": false,
        "downloads": 0,
        "likes": 0,
        "tags": [],
        "siblings": siblings,
    })
}

async fn info(
    State(hub): State<Arc<Hub>>,
    UrlPath((owner, name, rev)): UrlPath<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let repo = repo_id(&owner, &name);
    match hub.open(&repo, &rev, &headers) {
        Ok(snap) => axum::Json(info_json(
            &repo,
            &snap,
            hub.options.gated.contains_key(&repo),
        ))
        .into_response(),
        Err(r) => *r,
    }
}

async fn info_main(
    state: State<Arc<Hub>>,
    UrlPath((owner, name)): UrlPath<(String, String)>,
    headers: HeaderMap,
) -> Response {
    info(state, UrlPath((owner, name, "main".into())), headers).await
}

#[derive(serde::Deserialize, Default)]
struct TreeQuery {
    #[serde(default)]
    recursive: Option<String>,
}

async fn tree(
    State(hub): State<Arc<Hub>>,
    UrlPath(p): UrlPath<Vec<String>>,
    Query(q): Query<TreeQuery>,
    headers: HeaderMap,
) -> Response {
    let (owner, name, rev) = (&p[0], &p[1], &p[2]);
    let under = p.get(3).cloned().unwrap_or_default();
    let repo = repo_id(owner, name);
    let snap = match hub.open(&repo, rev, &headers) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let recursive = matches!(q.recursive.as_deref(), Some("true" | "True" | "1"));
    let prefix = if under.is_empty() {
        String::new()
    } else {
        format!("{}/", under.trim_end_matches('/'))
    };
    let mut out = Vec::new();
    let mut folders = std::collections::BTreeSet::new();
    for f in snap.files.iter().filter(|f| f.path.starts_with(&prefix)) {
        let rest = &f.path[prefix.len()..];
        match rest.split_once('/') {
            Some((folder, _)) if !recursive => {
                folders.insert(format!("{prefix}{folder}"));
            }
            _ => out.push(file_json(f)),
        }
    }
    if out.is_empty() && folders.is_empty() && !prefix.is_empty() {
        return hub_error(
            StatusCode::NOT_FOUND,
            "EntryNotFound",
            &format!("{under} does not exist on \"{rev}\""),
        );
    }
    for folder in folders {
        out.push(json!({"type": "directory", "path": folder, "oid": snap.commit, "size": 0}));
    }
    axum::Json(out).into_response()
}

fn set(h: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(name, v);
    }
}

async fn resolve(
    State(hub): State<Arc<Hub>>,
    method: Method,
    UrlPath((owner, name, rev, file)): UrlPath<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let repo = repo_id(&owner, &name);
    let snap = match hub.open(&repo, &rev, &headers) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let Some(f) = snap.files.iter().find(|f| f.path == file) else {
        return hub_error(
            StatusCode::NOT_FOUND,
            "EntryNotFound",
            &format!("{file} does not exist on \"{rev}\""),
        );
    };
    if let Some(sha) = &f.lfs_sha256 {
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("localhost");
        let mut r = StatusCode::FOUND.into_response();
        let h = r.headers_mut();
        set(h, "location", &format!("http://{host}/lfs/{repo}/{sha}"));
        set(h, "x-linked-etag", &format!("\"{sha}\""));
        set(h, "x-linked-size", &f.size.to_string());
        set(h, "etag", &format!("\"{sha}\""));
        set(h, "x-repo-commit", &snap.commit);
        return r;
    }
    let path = hub.root.join(&repo).join(&f.path);
    let mut r = send_file(&hub, &path, f.size, &method, &headers, false).await;
    set(r.headers_mut(), "etag", &format!("\"{}\"", f.oid));
    set(r.headers_mut(), "x-repo-commit", &snap.commit);
    r
}

async fn lfs(
    State(hub): State<Arc<Hub>>,
    method: Method,
    UrlPath((owner, name, sha)): UrlPath<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let repo = repo_id(&owner, &name);
    let snap = match hub.open(&repo, "main", &headers) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let Some(f) = snap
        .files
        .iter()
        .find(|f| f.lfs_sha256.as_deref() == Some(sha.as_str()))
    else {
        return hub_error(StatusCode::NOT_FOUND, "EntryNotFound", "no such object");
    };
    let path = hub.root.join(&repo).join(&f.path);
    let mut r = send_file(&hub, &path, f.size, &method, &headers, true).await;
    // The Hub's content hosts are other origins, which clients do not
    // follow on HEAD; this one is the same origin, and clients that follow
    // it read the file's metadata here as they would on the redirect.
    let h = r.headers_mut();
    set(h, "etag", &format!("\"{sha}\""));
    set(h, "x-linked-etag", &format!("\"{sha}\""));
    set(h, "x-linked-size", &f.size.to_string());
    set(h, "x-repo-commit", &snap.commit);
    r
}

/// `bytes=A-B`, `bytes=A-` or `bytes=-N` against a file of `len` bytes:
/// `Ok(None)` when absent or multi-range (the whole file is sent),
/// `Err` when unsatisfiable.
fn parse_range(headers: &HeaderMap, len: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
    else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().map_err(|_| ())?;
            (len.saturating_sub(n), len.checked_sub(1).ok_or(())?)
        }
        (a, "") => (a.parse().map_err(|_| ())?, len.checked_sub(1).ok_or(())?),
        (a, b) => {
            let b: u64 = b.parse().map_err(|_| ())?;
            (a.parse().map_err(|_| ())?, b.min(len.saturating_sub(1)))
        }
    };
    if start >= len || start > end {
        return Err(());
    }
    Ok(Some((start, end)))
}

/// A file's content, whole or the asked range, streamed.
async fn send_file(
    hub: &Arc<Hub>,
    path: &Path,
    len: u64,
    method: &Method,
    headers: &HeaderMap,
    faults: bool,
) -> Response {
    let range = match parse_range(headers, len) {
        Ok(r) => r,
        Err(()) => {
            let mut r = StatusCode::RANGE_NOT_SATISFIABLE.into_response();
            set(r.headers_mut(), "content-range", &format!("bytes */{len}"));
            return r;
        }
    };
    let (status, start, count) = match range {
        Some((a, b)) => (StatusCode::PARTIAL_CONTENT, a, b - a + 1),
        None => (StatusCode::OK, 0, len),
    };
    let mut resp = if *method == Method::HEAD {
        Response::new(Body::empty())
    } else {
        let mut file = match tokio::fs::File::open(path).await {
            Ok(f) => f,
            Err(e) => return internal(&e),
        };
        if let Err(e) = file.seek(std::io::SeekFrom::Start(start)).await {
            return internal(&e);
        }
        let cut = faults
            .then_some(hub.options.cut_first_download_after)
            .flatten()
            .filter(|_| !hub.cut_done.swap(true, Ordering::SeqCst));
        Response::new(body_of(file.take(count), cut, hub.options.bytes_per_sec))
    };
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    set(h, "content-length", &count.to_string());
    set(h, "accept-ranges", "bytes");
    set(h, "content-type", "application/octet-stream");
    if range.is_some() {
        set(
            h,
            "content-range",
            &format!("bytes {start}-{}/{len}", start + count - 1),
        );
    }
    resp
}

/// The body: chunks of the reader, cut after `cut` bytes with an error (the
/// connection drops), paced to `rate` bytes a second.
fn body_of(
    reader: impl tokio::io::AsyncRead + Send + 'static,
    cut: Option<u64>,
    rate: Option<u64>,
) -> Body {
    let stream = tokio_util::io::ReaderStream::with_capacity(reader, 64 * 1024);
    let mut sent = 0u64;
    let stream = stream.then(move |chunk| {
        // Up to the cut the bytes go out; the next read fails, after a
        // pause that lets the server flush what was sent.
        let (out, fail) = match chunk {
            Ok(c) => match cut {
                Some(n) if sent >= n => (None, true),
                Some(n) if sent + c.len() as u64 > n => {
                    let keep = usize::try_from(n - sent).unwrap_or(c.len());
                    sent = n;
                    (Some(c.slice(..keep)), false)
                }
                _ => {
                    sent += c.len() as u64;
                    (Some(c), false)
                }
            },
            Err(e) => return futures::future::Either::Left(futures::future::ready(Err(e))),
        };
        futures::future::Either::Right(async move {
            if fail {
                tokio::time::sleep(Duration::from_millis(300)).await;
                return Err(std::io::Error::other("connection cut (test fault)"));
            }
            let c = out.unwrap_or_default();
            if let Some(rate) = rate.filter(|r| *r > 0) {
                tokio::time::sleep(Duration::from_secs_f64(c.len() as f64 / rate as f64)).await;
            }
            Ok::<_, std::io::Error>(c)
        })
    });
    Body::from_stream(stream)
}

async fn log_access(State(hub): State<Arc<Hub>>, req: Request, next: Next) -> Response {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let range = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let resp = next.run(req).await;
    hub.record(Access {
        method,
        path,
        range,
        status: resp.status().as_u16(),
    });
    resp
}

/// The hub's routes.
pub fn router(hub: Arc<Hub>) -> Router {
    Router::new()
        .route("/api/models/{owner}/{name}", get(info_main))
        .route("/api/models/{owner}/{name}/revision/{rev}", get(info))
        .route("/api/models/{owner}/{name}/tree/{rev}", get(tree))
        .route("/api/models/{owner}/{name}/tree/{rev}/{*path}", get(tree))
        .route("/{owner}/{name}/resolve/{rev}/{*file}", get(resolve))
        .route("/lfs/{owner}/{name}/{sha}", get(lfs))
        .layer(axum::middleware::from_fn_with_state(
            hub.clone(),
            log_access,
        ))
        .with_state(hub)
}

/// Serves `hub` on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, hub: Arc<Hub>) -> std::io::Result<()> {
    axum::serve(listener, router(hub)).await
}

/// A hub on a free loopback port, served by a background task: its base
/// URL and its state (tests, the demo).
pub async fn spawn_local(root: &Path, options: HubOptions) -> std::io::Result<(String, Arc<Hub>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let hub = Hub::new(root, options);
    let h = hub.clone();
    tokio::spawn(async move {
        if let Err(e) = serve(listener, h).await {
            tracing::error!(error = %e, "hub stopped");
        }
    });
    Ok((format!("http://{addr}"), hub))
}
