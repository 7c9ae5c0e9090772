//! The model cache on disk: content-addressed blobs, snapshots of links to
//! them, locks, and least-recently-used eviction.
//!
//! ```text
//! CACHE/blobs/sha256-<hex>            an LFS file, verified against its sha256
//! CACHE/blobs/git-<oid>               a small file, verified against its git blob id
//! CACHE/partial/<blob>/<chunk>        chunks being downloaded (resumed from their length)
//! CACHE/models/<owner>--<name>/snapshots/<commit>/<path>   relative symlinks to blobs
//! CACHE/models/<owner>--<name>/revisions/<rev>             symlink to ../snapshots/<commit>
//! CACHE/models/<owner>--<name>/last-used/<commit>          its mtime: the last fetch
//! CACHE/locks/<owner>--<name>.lock    one fetcher per model at a time (flock)
//! CACHE/locks/cache.lock              fetches hold it shared, eviction exclusive
//! ```
//!
//! Two ModelDeployments of one model (same commit) share the blobs; two
//! revisions sharing a file share its blob. Every blob is renamed into
//! place only after its hash matched, so what `snapshots/` links to is
//! whole and verified; a fetch hashes cached blobs again before it trusts
//! them (a flipped byte on disk is fetched again).
//!
//! "In use": the fetcher cannot ask the API server (the Pod has no
//! credentials), so models in use are named in a file (`--in-use`, one
//! `OWNER/NAME` or `OWNER/NAME@COMMIT` a line; the controller mounts it from
//! a ConfigMap of every ModelDeployment's repo), and the model being
//! fetched is always in use. Eviction removes the least recently fetched
//! snapshots of other models until the blobs fit the limit, then the blobs
//! no snapshot links to.

use std::collections::{BTreeSet, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rustix::fs::{FlockOperation, flock};

/// A cache rooted at a directory.
#[derive(Debug, Clone)]
pub struct Cache {
    pub root: PathBuf,
}

/// A held flock; released when dropped (the file is closed).
#[derive(Debug)]
pub struct Lock(#[allow(dead_code)] File);

/// The cache's directory name for a repo id (`owner/name` → `owner--name`).
pub fn repo_key(repo: &str) -> String {
    repo.replace('/', "--")
}

impl Cache {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn blob(&self, id: &str) -> PathBuf {
        self.root.join("blobs").join(id)
    }

    pub fn partial(&self, id: &str) -> PathBuf {
        self.root.join("partial").join(id)
    }

    pub fn model_dir(&self, repo: &str) -> PathBuf {
        self.root.join("models").join(repo_key(repo))
    }

    pub fn snapshot(&self, repo: &str, commit: &str) -> PathBuf {
        self.model_dir(repo).join("snapshots").join(commit)
    }

    /// The path the engine loads: follows the revision to its snapshot.
    pub fn revision(&self, repo: &str, rev: &str) -> PathBuf {
        self.model_dir(repo).join("revisions").join(rev)
    }

    fn lock_file(&self, name: &str) -> std::io::Result<File> {
        let dir = self.root.join("locks");
        std::fs::create_dir_all(&dir)?;
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(name))
    }

    /// The model's lock, exclusive: the second fetcher of a model waits for
    /// the first, then finds the blobs in place. `on_wait` is called when
    /// another holds it.
    pub async fn lock_model(&self, repo: &str, on_wait: impl FnOnce()) -> std::io::Result<Lock> {
        let f = self.lock_file(&format!("{}.lock", repo_key(repo)))?;
        if flock(&f, FlockOperation::NonBlockingLockExclusive).is_ok() {
            return Ok(Lock(f));
        }
        on_wait();
        blocking_flock(f, FlockOperation::LockExclusive).await
    }

    /// The cache-wide lock, shared: eviction waits for no running fetch.
    pub async fn lock_shared(&self) -> std::io::Result<Lock> {
        let f = self.lock_file("cache.lock")?;
        blocking_flock(f, FlockOperation::LockShared).await
    }

    /// The cache-wide lock, exclusive, only if no fetch holds it now.
    pub fn try_lock_exclusive(&self) -> std::io::Result<Option<Lock>> {
        let f = self.lock_file("cache.lock")?;
        Ok(flock(&f, FlockOperation::NonBlockingLockExclusive)
            .ok()
            .map(|()| Lock(f)))
    }

    /// Records that `repo@commit` was fetched now (its LRU age).
    pub fn touch(&self, repo: &str, commit: &str) -> std::io::Result<()> {
        let dir = self.model_dir(repo).join("last-used");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(commit), b"")
    }

    /// Total bytes of the blobs.
    pub fn blob_bytes(&self) -> std::io::Result<u64> {
        let mut total = 0;
        for e in read_dir_or_empty(&self.root.join("blobs"))? {
            total += e.metadata()?.len();
        }
        Ok(total)
    }

    /// Every snapshot: (repo key, commit, last use).
    fn snapshots(&self) -> std::io::Result<Vec<(String, String, SystemTime)>> {
        let mut out = Vec::new();
        for m in read_dir_or_empty(&self.root.join("models"))? {
            let key = m.file_name().to_string_lossy().into_owned();
            for s in read_dir_or_empty(&m.path().join("snapshots"))? {
                let commit = s.file_name().to_string_lossy().into_owned();
                let used = std::fs::metadata(m.path().join("last-used").join(&commit))
                    .and_then(|m| m.modified())
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                out.push((key.clone(), commit, used));
            }
        }
        Ok(out)
    }

    /// Evicts least recently used snapshots not in `in_use` (repo keys, or
    /// `key@commit`) until the blobs take at most `limit` bytes; returns the
    /// snapshots removed. Runs only when no fetch holds the cache lock.
    pub fn evict(&self, limit: u64, in_use: &HashSet<String>) -> std::io::Result<Vec<String>> {
        let Some(_lock) = self.try_lock_exclusive()? else {
            tracing::info!("another fetch is running; eviction waits for a later fetch");
            return Ok(Vec::new());
        };
        let mut removed = Vec::new();
        let mut snaps = self.snapshots()?;
        snaps.sort_by_key(|s| s.2);
        for (key, commit, _) in snaps {
            if self.blob_bytes()? <= limit {
                break;
            }
            if in_use.contains(&key) || in_use.contains(&format!("{key}@{commit}")) {
                continue;
            }
            let model = self.root.join("models").join(&key);
            std::fs::remove_dir_all(model.join("snapshots").join(&commit))?;
            let _ = std::fs::remove_file(model.join("last-used").join(&commit));
            for r in read_dir_or_empty(&model.join("revisions"))? {
                let target = std::fs::read_link(r.path()).unwrap_or_default();
                if target.file_name() == Some(std::ffi::OsStr::new(&commit)) {
                    std::fs::remove_file(r.path())?;
                }
            }
            self.remove_unlinked_blobs()?;
            removed.push(format!("{key}@{commit}"));
        }
        Ok(removed)
    }

    /// Deletes blobs no snapshot links to.
    fn remove_unlinked_blobs(&self) -> std::io::Result<()> {
        let mut linked = BTreeSet::new();
        for m in read_dir_or_empty(&self.root.join("models"))? {
            for s in read_dir_or_empty(&m.path().join("snapshots"))? {
                collect_links(&s.path(), &mut linked)?;
            }
        }
        for b in read_dir_or_empty(&self.root.join("blobs"))? {
            if !linked.contains(&b.file_name().to_string_lossy().into_owned()) {
                std::fs::remove_file(b.path())?;
            }
        }
        Ok(())
    }
}

fn collect_links(dir: &Path, out: &mut BTreeSet<String>) -> std::io::Result<()> {
    for e in read_dir_or_empty(dir)? {
        let ft = e.file_type()?;
        if ft.is_dir() {
            collect_links(&e.path(), out)?;
        } else if ft.is_symlink()
            && let Some(name) = std::fs::read_link(e.path())?.file_name()
        {
            out.insert(name.to_string_lossy().into_owned());
        }
    }
    Ok(())
}

fn read_dir_or_empty(dir: &Path) -> std::io::Result<Vec<std::fs::DirEntry>> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd.collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

async fn blocking_flock(f: File, op: FlockOperation) -> std::io::Result<Lock> {
    tokio::task::spawn_blocking(move || {
        flock(&f, op)?;
        Ok(Lock(f))
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Makes `link` a symlink to `target`, replacing what is there atomically.
pub fn replace_symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    if let Some(dir) = link.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = link.with_file_name(format!(
        ".{}.tmp-{}",
        link.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)?;
    std::fs::rename(&tmp, link)
}
