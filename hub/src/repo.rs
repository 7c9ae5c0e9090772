//! A model repository as the Hub describes it: its files, their git blob
//! ids, the sha256 of the large (LFS) ones, and a commit id, all derived
//! from a directory on disk.
//!
//! The Hub stores weights in git LFS and the small files in git itself; its
//! API says which is which (`lfs: {oid, size}` with the file's sha256) and
//! clients verify each kind against its own hash (LFS: sha256; git: the
//! blob id, sha1 of `blob {len}\0` + content). A directory has no git
//! history, so its "commit" is a hash of the file list and their hashes:
//! any change to any file gives a new commit, as a push would.

use std::path::{Component, Path, PathBuf};

use sha1::Digest as _;

/// Files stored in LFS (by name, as a `.gitattributes` of a model repo
/// says): the weights. Everything else is a git blob.
pub fn is_lfs(path: &str) -> bool {
    [
        ".safetensors",
        ".gguf",
        ".bin",
        ".pt",
        ".pth",
        ".onnx",
        ".h5",
    ]
    .iter()
    .any(|ext| path.ends_with(ext))
}

/// One file of a repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoFile {
    /// Path inside the repository, `/`-separated.
    pub path: String,
    pub size: u64,
    /// Git blob id (40 hex).
    pub oid: String,
    /// sha256 (64 hex) for LFS files.
    pub lfs_sha256: Option<String>,
}

/// A repository snapshot read from a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoSnapshot {
    pub commit: String,
    pub files: Vec<RepoFile>,
}

/// Git's blob id of `data`.
pub fn git_blob_oid(data: &[u8]) -> String {
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", data.len()).as_bytes());
    h.update(data);
    format!("{:x}", h.finalize())
}

/// Hashes of one file, read once.
fn hash_file(path: &Path) -> std::io::Result<(u64, String, String)> {
    use std::io::Read as _;
    let len = std::fs::metadata(path)?.len();
    let mut f = std::fs::File::open(path)?;
    let mut git = sha1::Sha1::new();
    git.update(format!("blob {len}\0").as_bytes());
    let mut sha = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        git.update(&buf[..n]);
        sha.update(&buf[..n]);
    }
    Ok((
        len,
        format!("{:x}", git.finalize()),
        format!("{:x}", sha.finalize()),
    ))
}

/// Whether a repo-relative path is plain (no `..`, not absolute, no hidden
/// part): paths come from URLs, i.e. from outside.
pub fn is_plain_path(path: &str) -> bool {
    !path.is_empty()
        && Path::new(path)
            .components()
            .all(|c| matches!(c, Component::Normal(s) if !s.to_string_lossy().starts_with('.')))
}

/// Every file under `dir` (hidden files and folders skipped), sorted.
fn walk(dir: &Path, prefix: &str, out: &mut Vec<(String, PathBuf)>) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let rel = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}/{name}")
        };
        let ft = std::fs::metadata(e.path())?;
        if ft.is_dir() {
            walk(&e.path(), &rel, out)?;
        } else if ft.is_file() {
            out.push((rel, e.path()));
        }
    }
    Ok(())
}

/// Reads a repository directory: every file hashed, and the commit id.
pub fn read_repo(dir: &Path) -> std::io::Result<RepoSnapshot> {
    let mut paths = Vec::new();
    walk(dir, "", &mut paths)?;
    let mut files = Vec::with_capacity(paths.len());
    let mut commit = sha1::Sha1::new();
    for (rel, path) in paths {
        let (size, oid, sha256) = hash_file(&path)?;
        commit.update(format!("{rel} {oid} {sha256}\n").as_bytes());
        files.push(RepoFile {
            lfs_sha256: is_lfs(&rel).then_some(sha256),
            path: rel,
            size,
            oid,
        });
    }
    Ok(RepoSnapshot {
        commit: format!("{:x}", commit.finalize()),
        files,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_git_blob_id_is_gits_own() {
        // `printf 'hello\n' | git hash-object --stdin`
        assert_eq!(
            git_blob_oid(b"hello\n"),
            "ce013625030ba8dba906f756967f9e9ca394464a"
        );
    }

    #[test]
    fn paths_from_outside_must_be_plain() {
        assert!(is_plain_path("config.json"));
        assert!(is_plain_path("sub/model.safetensors"));
        for bad in [
            "",
            "../x",
            "/etc/passwd",
            "a/../../b",
            ".git/config",
            "a/.hidden",
        ] {
            assert!(!is_plain_path(bad), "{bad}");
        }
    }
}
