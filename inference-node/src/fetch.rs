//! `copyhold-node fetch`: the model's files from the Hugging Face Hub or a
//! mirror into the node's model cache, before the engine starts (the
//! ModelDeployment's init container). The work is `copyhold_hub::fetch`;
//! this is its command line.

use std::path::PathBuf;

use copyhold_hub::fetch::{FetchError, FetchRequest, fetch_with};
use copyhold_hub::progress::Progress;

/// Arguments of `copyhold-node fetch`.
#[derive(clap::Args, Debug, Clone)]
pub struct FetchArgs {
    /// Repository id, `OWNER/NAME`.
    #[arg(
        long,
        env = "COPYHOLD_FETCH_REPO",
        required_unless_present = "mirror",
        conflicts_with = "mirror"
    )]
    pub repo: Option<String>,
    /// A plain HTTP mirror: the URL of the model's directory, which serves
    /// a `SHA256SUMS` manifest beside the files (in place of --repo and
    /// --endpoint; the files and hashes come from the manifest).
    #[arg(long, env = "COPYHOLD_FETCH_MIRROR")]
    pub mirror: Option<String>,
    /// Branch, tag or commit.
    #[arg(long, env = "COPYHOLD_FETCH_REVISION", default_value = "main")]
    pub revision: String,
    /// Glob allow-list over the repo's paths (repeatable; default: config,
    /// generation config, tokenizer files, safetensors and their index).
    #[arg(long = "file", env = "COPYHOLD_FETCH_FILES", value_delimiter = ',')]
    pub files: Vec<String>,
    /// The Hub or a mirror speaking its protocol.
    #[arg(long, env = "HF_ENDPOINT", default_value = "https://huggingface.co")]
    pub endpoint: String,
    /// A file holding the Hugging Face token (gated or private repos).
    #[arg(long, env = "COPYHOLD_FETCH_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// The model cache (a hostPath or a ReadWriteMany volume).
    #[arg(
        long,
        env = "COPYHOLD_MODEL_CACHE",
        default_value = "/var/cache/copyhold-models"
    )]
    pub cache: PathBuf,
    /// Where to keep the progress JSON (bytesDone, bytesTotal, rate, etaSeconds).
    #[arg(long, env = "COPYHOLD_FETCH_PROGRESS_FILE")]
    pub progress_file: Option<PathBuf>,
    /// Serve the progress as `GET /progress` here while fetching (the
    /// ModelDeployment controller reads it from the Pod's engine port).
    #[arg(long, env = "COPYHOLD_FETCH_PROGRESS_ADDR")]
    pub progress_addr: Option<std::net::SocketAddr>,
    /// Bytes per ranged request; larger files come in parallel chunks.
    #[arg(long, default_value_t = 64 << 20)]
    pub chunk_bytes: u64,
    /// Chunks in flight at once.
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// Evict least-recently-used models not in use down to this many bytes.
    #[arg(long, env = "COPYHOLD_MODEL_CACHE_MAX_BYTES")]
    pub max_cache_bytes: Option<u64>,
    /// A file naming the models in use (`OWNER/NAME[@COMMIT]` a line).
    #[arg(long, env = "COPYHOLD_MODELS_IN_USE_FILE")]
    pub in_use_file: Option<PathBuf>,
}

/// Why `copyhold-node fetch` failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchCommandError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("building the HTTP client: {0}")]
    Client(String),
    #[error("listening on {addr} for the progress: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

fn read(path: &PathBuf) -> Result<String, FetchCommandError> {
    std::fs::read_to_string(path).map_err(|source| FetchCommandError::Read {
        path: path.display().to_string(),
        source,
    })
}

impl FetchArgs {
    /// The request these arguments describe (the token from its file or
    /// `HF_TOKEN`).
    pub fn request(&self) -> Result<FetchRequest, FetchCommandError> {
        let mut r = match (&self.mirror, &self.repo) {
            (Some(url), _) => FetchRequest::from_mirror(url, &self.cache),
            (None, Some(repo)) => {
                FetchRequest::new(&self.endpoint, repo, &self.revision, &self.cache)
            }
            (None, None) => {
                return Err(FetchCommandError::Fetch(FetchError::BadRequest(
                    "give --repo OWNER/NAME or --mirror URL".into(),
                )));
            }
        };
        r.files = self.files.clone();
        r.token = match &self.token_file {
            Some(p) => Some(read(p)?.trim().to_string()),
            None => std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()),
        };
        r.progress_file = self.progress_file.clone();
        r.chunk_bytes = self.chunk_bytes;
        r.parallel = self.parallel;
        r.max_cache_bytes = self.max_cache_bytes;
        if let Some(p) = &self.in_use_file {
            match in_use(p)? {
                Some(models) => r.in_use = models,
                None => {
                    eprintln!(
                        "fetch: {} is missing, so which models are in use is unknown: no eviction this time",
                        p.display()
                    );
                    r.max_cache_bytes = None;
                }
            }
        }
        Ok(r)
    }
}

/// The models named in the in-use file (`OWNER/NAME[@COMMIT]` a line), or
/// `None` when the file is missing: the controller's ConfigMap is mounted
/// as optional, and a Pod started before it exists must not evict models
/// it cannot know are in use.
fn in_use(path: &PathBuf) -> Result<Option<Vec<String>>, FetchCommandError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(FetchCommandError::Read {
                path: path.display().to_string(),
                source,
            });
        }
    };
    Ok(Some(
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_string)
            .collect(),
    ))
}

/// Runs the fetch; prints the directory to serve on stdout.
pub fn run(args: &FetchArgs) -> Result<(), FetchCommandError> {
    let req = args.request()?;
    let rt =
        tokio::runtime::Runtime::new().map_err(|e| FetchCommandError::Client(e.to_string()))?;
    let client = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(30))
        .build()
        .map_err(|e| FetchCommandError::Client(e.to_string()))?;
    let progress = Progress::new(&req.repo, req.progress_file.clone());
    let got = rt.block_on(async {
        if let Some(addr) = args.progress_addr {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| FetchCommandError::Listen { addr, source })?;
            tokio::spawn(copyhold_hub::progress::serve(listener, progress.clone()));
        }
        fetch_with(&client, &req, progress)
            .await
            .map_err(FetchCommandError::from)
    })?;
    println!("{}", got.dir.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        fetch: FetchArgs,
    }

    /// An empty directory of this test's own.
    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("copyhold-fetch-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn args(extra: &[&str]) -> FetchArgs {
        let mut argv = vec!["fetch", "--repo", "town/tiny", "--max-cache-bytes", "1000"];
        argv.extend(extra);
        Cli::parse_from(argv).fetch
    }

    #[test]
    fn a_missing_in_use_file_turns_eviction_off_and_the_fetch_goes_on() {
        let missing = scratch("missing").join("models");
        let req = args(&["--in-use-file", missing.to_str().unwrap()])
            .request()
            .expect("a missing in-use file is not an error");
        assert_eq!(req.max_cache_bytes, None, "nothing evicted blind");
    }

    #[test]
    fn the_in_use_file_names_the_models_kept() {
        let file = scratch("named").join("models");
        std::fs::write(&file, "# in use\ntown/a\n\n  town/b@abc \n").unwrap();
        let req = args(&["--in-use-file", file.to_str().unwrap()])
            .request()
            .unwrap();
        assert_eq!(req.max_cache_bytes, Some(1000));
        assert_eq!(req.in_use, vec!["town/a", "town/b@abc"]);
    }
}
