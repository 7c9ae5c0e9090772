//! `copyhold models pull` and `copyhold models serve`: models for
//! air-gapped sites. `pull` fetches a repository (verified, resumable) and
//! lays it out as `DIR/OWNER/NAME/…`; `serve` is a mirror of such a
//! directory speaking the Hub's protocol, which ModelDeployments name as
//! `spec.model.source.huggingFace.endpoint`.

use std::path::{Path, PathBuf};

use copyhold_hub::fetch::{FetchRequest, fetch};
use copyhold_hub::server::{Hub, HubOptions, serve as serve_hub};

/// Where `pull` keeps its verified cache inside DIR (hidden: the mirror
/// does not list it).
pub const PULL_CACHE: &str = ".copyhold-cache";

/// Fetches `repo@revision` from `endpoint` into `dir/OWNER/NAME`, the files
/// hard-linked from the verified cache in `dir/.copyhold-cache`; the
/// commit it came from is kept in `.copyhold-commit`, so the mirror
/// answers with the same commit as the Hub. Returns the model directory.
pub async fn pull(
    endpoint: &str,
    repo: &str,
    revision: &str,
    files: &[String],
    token: Option<String>,
    dir: &Path,
) -> anyhow::Result<PathBuf> {
    let mut req = FetchRequest::new(endpoint, repo, revision, &dir.join(PULL_CACHE));
    req.files = files.to_vec();
    req.token = token;
    let client = reqwest::Client::builder().build()?;
    let got = fetch(&client, &req).await?;
    let out = dir.join(repo);
    for f in &got.files {
        let target = out.join(&f.path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let blob = std::fs::canonicalize(got.dir.join(&f.path))?;
        let _ = std::fs::remove_file(&target);
        std::fs::hard_link(&blob, &target)
            .or_else(|_| std::fs::copy(&blob, &target).map(|_| ()))?;
    }
    std::fs::write(out.join(copyhold_hub::server::COMMIT_FILE), &got.commit)?;
    eprintln!(
        "pulled {repo}@{revision} (commit {}): {} files into {}",
        got.commit,
        got.files.len(),
        out.display()
    );
    Ok(out)
}

/// Serves `dir` as a Hub mirror on `listen` until stopped.
pub async fn serve(
    dir: &Path,
    listen: std::net::SocketAddr,
    access_log: Option<PathBuf>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    eprintln!(
        "serving the models under {} as a Hub mirror on http://{}",
        dir.display(),
        listener.local_addr()?
    );
    let options = HubOptions {
        access_log,
        ..HubOptions::default()
    };
    serve_hub(listener, Hub::new(dir, options)).await?;
    Ok(())
}
