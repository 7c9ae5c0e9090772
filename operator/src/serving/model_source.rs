//! Reads what sizing needs — `config.json` and the safetensors headers — from
//! a model source, fetching as little as possible: weights can be tens of
//! gigabytes, headers are kilobytes.
//!
//! - `http`: `GET {url}/config.json`; then `model.safetensors.index.json`
//!   (sharded) or `model.safetensors`; of each weight file only the 8-byte
//!   length prefix (`Range: bytes=0-7`) and the header
//!   (`Range: bytes=8-{8+n-1}`). A server that ignores `Range` is read only
//!   as far as needed, then the connection is dropped.
//! - `hostPath`: the same files from the controller's own filesystem when the
//!   path exists there (a shared mount); otherwise sizing must be inline.
//! - GGUF files (`format: gguf`): their header only, in growing range
//!   requests or from the local file ([`crate::serving::gguf_source`]).
//! - `pvc` and `oci`: the controller does not read them; sizing must be
//!   given inline (`model.sizing`).
//!
//! Headers over 100 MB are refused: real ones are well under 1 MB, and the
//! length prefix comes from outside.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::header::{CONTENT_RANGE, RANGE};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::resources::model_deployment::{ModelDeploymentSpec, ModelFormat, ModelSource};
use crate::serving::gguf_header::GgufError;
use crate::serving::gguf_source::{self, GgufSource, MAX_GGUF_HEADER_BYTES};
use crate::serving::sizing::{
    HfConfig, ModelNeeds, SafetensorsHeader, SizingError, SizingInput, parse_compute_capability,
};

/// Longest one request to a model server may take: a server that stalls
/// must not hold a reconcile forever.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest safetensors header read.
pub const MAX_HEADER_BYTES: u64 = 100_000_000;
/// Largest `config.json` or `model.safetensors.index.json` read.
pub const MAX_JSON_BYTES: u64 = 16 * 1024 * 1024;
/// File naming the shards of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The single weight file of an unsharded checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";

/// Why the model could not be read or sized. [`SourceError::reason`] gives the
/// condition reason.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("GET {url}: HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("GET {url}: {message}")]
    Transport { url: String, message: String },
    #[error("{url}: safetensors header of {bytes} bytes is over the {MAX_HEADER_BYTES}-byte limit")]
    HeaderTooLarge { url: String, bytes: u64 },
    #[error("{url}: larger than the {limit}-byte limit for this file")]
    TooLarge { url: String, limit: u64 },
    #[error("{url}: {message}")]
    Malformed { url: String, message: String },
    #[error("{url}: {source}")]
    Sizing { url: String, source: SizingError },
    #[error("reading {path}: {message}")]
    Io { path: String, message: String },
    #[error("{what}; give the model's size inline in spec.model.sizing")]
    NeedsInlineSizing { what: String },
    #[error("spec.model.sizing or serving: {0}")]
    InvalidSizing(SizingError),
    #[error("{url}: {source}")]
    Gguf { url: String, source: GgufError },
    #[error(
        "{url}: the GGUF header needs at least {bytes} bytes, over the {MAX_GGUF_HEADER_BYTES}-byte limit"
    )]
    GgufHeaderTooLarge { url: String, bytes: u64 },
    #[error(
        "spec.model.source.huggingFace.files must name the model's one .gguf file, without wildcards (e.g. `files: [model-Q4_K_M.gguf]`); it is {files:?}"
    )]
    NeedsGgufFile { files: Vec<String> },
}

impl SourceError {
    /// The `Placed=False` condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            SourceError::InvalidSizing(_) => "InvalidSizing",
            _ => "ModelUnreadable",
        }
    }
}

/// What was read from a model directory.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelFiles {
    pub config: HfConfig,
    /// Weight file names, in order.
    pub weight_files: Vec<String>,
    /// Their headers, in the same order.
    pub headers: Vec<SafetensorsHeader>,
}

/// What was read from a source: what sizing needs of each format.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceModel {
    Safetensors(ModelFiles),
    Gguf(GgufSource),
}

/// Where the files are.
enum Location<'a> {
    Http {
        client: &'a reqwest::Client,
        base: String,
        timeout: Duration,
    },
    Dir(PathBuf),
}

impl Location<'_> {
    fn name(&self, file: &str) -> String {
        match self {
            Location::Http { base, .. } => format!("{base}/{file}"),
            Location::Dir(d) => d.join(file).display().to_string(),
        }
    }

    /// A whole small file; `None` when it does not exist.
    async fn small_file(&self, file: &str) -> Result<Option<Vec<u8>>, SourceError> {
        let url = self.name(file);
        match self {
            Location::Http {
                client, timeout, ..
            } => {
                let mut resp = client
                    .get(&url)
                    .timeout(*timeout)
                    .send()
                    .await
                    .map_err(|e| transport(&url, e))?;
                let status = resp.status();
                if status == StatusCode::NOT_FOUND || status == StatusCode::GONE {
                    return Ok(None);
                }
                if !status.is_success() {
                    return Err(SourceError::Status {
                        url,
                        status: status.as_u16(),
                    });
                }
                let mut buf = Vec::new();
                while let Some(chunk) = resp.chunk().await.map_err(|e| transport(&url, e))? {
                    buf.extend_from_slice(&chunk);
                    if buf.len() as u64 > MAX_JSON_BYTES {
                        return Err(SourceError::TooLarge {
                            url,
                            limit: MAX_JSON_BYTES,
                        });
                    }
                }
                Ok(Some(buf))
            }
            Location::Dir(dir) => {
                let path = dir.join(file);
                let meta = match tokio::fs::metadata(&path).await {
                    Ok(m) => m,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(io(&path, e)),
                };
                if meta.len() > MAX_JSON_BYTES {
                    return Err(SourceError::TooLarge {
                        url,
                        limit: MAX_JSON_BYTES,
                    });
                }
                tokio::fs::read(&path)
                    .await
                    .map(Some)
                    .map_err(|e| io(&path, e))
            }
        }
    }

    /// Exactly `len` bytes of `file` from `start`.
    async fn range(&self, file: &str, start: u64, len: u64) -> Result<Vec<u8>, SourceError> {
        let url = self.name(file);
        let short = |got: usize| SourceError::Malformed {
            url: url.clone(),
            message: format!("file ends after {got} of {len} bytes read from offset {start}"),
        };
        match self {
            Location::Http {
                client, timeout, ..
            } => {
                let end = start + len - 1;
                let mut resp = client
                    .get(&url)
                    .header(RANGE, format!("bytes={start}-{end}"))
                    .timeout(*timeout)
                    .send()
                    .await
                    .map_err(|e| transport(&url, e))?;
                let status = resp.status();
                // 206: the range. 200: a server that ignores Range sends the
                // whole file; skip to `start` and stop reading at `len`.
                let mut skip = match status {
                    StatusCode::PARTIAL_CONTENT => {
                        let cr = resp
                            .headers()
                            .get(CONTENT_RANGE)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("");
                        if !cr.is_empty() && !cr.starts_with(&format!("bytes {start}-")) {
                            return Err(SourceError::Malformed {
                                url,
                                message: format!("asked for bytes {start}-{end}, got `{cr}`"),
                            });
                        }
                        0
                    }
                    StatusCode::OK => start,
                    s => {
                        return Err(SourceError::Status {
                            url,
                            status: s.as_u16(),
                        });
                    }
                };
                let want = usize::try_from(len).map_err(|_| short(0))?;
                let mut buf = Vec::with_capacity(want.min(1 << 20));
                while buf.len() < want {
                    let Some(chunk) = resp.chunk().await.map_err(|e| transport(&url, e))? else {
                        break;
                    };
                    let mut c = &chunk[..];
                    if skip > 0 {
                        let s = usize::try_from(skip).unwrap_or(usize::MAX).min(c.len());
                        skip -= s as u64;
                        c = &c[s..];
                    }
                    let take = (want - buf.len()).min(c.len());
                    buf.extend_from_slice(&c[..take]);
                }
                if buf.len() < want {
                    return Err(short(buf.len()));
                }
                Ok(buf)
            }
            Location::Dir(dir) => {
                let path = dir.join(file);
                let mut f = tokio::fs::File::open(&path)
                    .await
                    .map_err(|e| io(&path, e))?;
                f.seek(std::io::SeekFrom::Start(start))
                    .await
                    .map_err(|e| io(&path, e))?;
                let want = usize::try_from(len).map_err(|_| short(0))?;
                let mut buf = Vec::with_capacity(want);
                (&mut f)
                    .take(len)
                    .read_to_end(&mut buf)
                    .await
                    .map_err(|e| io(&path, e))?;
                if buf.len() < want {
                    return Err(short(buf.len()));
                }
                Ok(buf)
            }
        }
    }
}

fn transport(url: &str, e: reqwest::Error) -> SourceError {
    SourceError::Transport {
        url: url.to_string(),
        message: e.to_string(),
    }
}

fn io(path: &Path, e: std::io::Error) -> SourceError {
    SourceError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// Shard names come from the index, i.e. from outside: plain file names only.
fn check_shard_name(url: &str, name: &str) -> Result<(), SourceError> {
    if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
        return Err(SourceError::Malformed {
            url: url.to_string(),
            message: format!("shard `{name}` is not a plain file name"),
        });
    }
    Ok(())
}

async fn read_files(loc: &Location<'_>) -> Result<ModelFiles, SourceError> {
    let config_url = loc.name("config.json");
    let config_bytes = loc
        .small_file("config.json")
        .await?
        .ok_or_else(|| SourceError::Status {
            url: config_url.clone(),
            status: 404,
        })?;
    let config = HfConfig::from_json(&config_bytes).map_err(|source| SourceError::Sizing {
        url: config_url,
        source,
    })?;

    let weight_files = match loc.small_file(INDEX_FILE).await? {
        Some(index) => {
            let url = loc.name(INDEX_FILE);
            let v: serde_json::Value =
                serde_json::from_slice(&index).map_err(|e| SourceError::Malformed {
                    url: url.clone(),
                    message: e.to_string(),
                })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| SourceError::Malformed {
                    url: url.clone(),
                    message: "no `weight_map` object".into(),
                })?;
            let mut files = BTreeSet::new();
            for f in map.values() {
                let name = f.as_str().ok_or_else(|| SourceError::Malformed {
                    url: url.clone(),
                    message: "a `weight_map` value is not a string".into(),
                })?;
                check_shard_name(&url, name)?;
                files.insert(name.to_string());
            }
            if files.is_empty() {
                return Err(SourceError::Malformed {
                    url,
                    message: "`weight_map` names no file".into(),
                });
            }
            files.into_iter().collect()
        }
        None => vec![SINGLE_FILE.to_string()],
    };

    let mut headers = Vec::with_capacity(weight_files.len());
    for file in &weight_files {
        let url = loc.name(file);
        let prefix = loc.range(file, 0, 8).await?;
        let n = SafetensorsHeader::header_len(&prefix).map_err(|source| SourceError::Sizing {
            url: url.clone(),
            source,
        })?;
        if n > MAX_HEADER_BYTES {
            return Err(SourceError::HeaderTooLarge { url, bytes: n });
        }
        if n == 0 {
            return Err(SourceError::Malformed {
                url,
                message: "empty safetensors header".into(),
            });
        }
        let json = loc.range(file, 8, n).await?;
        let header = SafetensorsHeader::parse(&json)
            .map_err(|source| SourceError::Sizing { url, source })?;
        headers.push(header);
    }
    Ok(ModelFiles {
        config,
        weight_files,
        headers,
    })
}

/// Reads config and headers from an http(s) model directory.
pub async fn read_http(
    client: &reqwest::Client,
    base_url: &str,
) -> Result<ModelFiles, SourceError> {
    read_http_within(client, base_url, REQUEST_TIMEOUT).await
}

async fn read_http_within(
    client: &reqwest::Client,
    base_url: &str,
    timeout: Duration,
) -> Result<ModelFiles, SourceError> {
    read_files(&Location::Http {
        client,
        base: base_url.trim_end_matches('/').to_string(),
        timeout,
    })
    .await
}

/// Reads config and headers from a model directory on this machine.
pub async fn read_dir(dir: &Path) -> Result<ModelFiles, SourceError> {
    read_files(&Location::Dir(dir.to_path_buf())).await
}

/// Reads what sizing needs from the spec's source, if the controller can:
/// config and safetensors headers, or the GGUF header.
pub async fn read_source(
    client: &reqwest::Client,
    source: &ModelSource,
    format: ModelFormat,
) -> Result<SourceModel, SourceError> {
    match format {
        ModelFormat::Gguf => gguf_source::read_source(client, source)
            .await
            .map(SourceModel::Gguf),
        ModelFormat::Safetensors => read_safetensors(client, source)
            .await
            .map(SourceModel::Safetensors),
    }
}

/// Reads config and safetensors headers from the spec's source.
async fn read_safetensors(
    client: &reqwest::Client,
    source: &ModelSource,
) -> Result<ModelFiles, SourceError> {
    if let Some(h) = &source.http {
        return read_http(client, &h.url).await;
    }
    if let Some(h) = &source.hugging_face {
        return read_http(client, &h.resolve_url()).await;
    }
    if let Some(h) = &source.host_path {
        let dir = Path::new(&h.path);
        if tokio::fs::metadata(dir).await.is_ok_and(|m| m.is_dir()) {
            return read_dir(dir).await;
        }
        return Err(SourceError::NeedsInlineSizing {
            what: format!(
                "hostPath {} does not exist on the controller's machine",
                h.path
            ),
        });
    }
    let what = if source.pvc.is_some() {
        "the controller does not mount PVC sources"
    } else if source.oci.is_some() {
        "the controller does not pull OCI sources"
    } else {
        "spec.model.source names no source"
    };
    Err(SourceError::NeedsInlineSizing { what: what.into() })
}

/// What one replica of the spec's model needs: from `spec.model.sizing` when
/// given (no I/O: the user's numbers win), else from the source.
pub async fn model_needs(
    client: &reqwest::Client,
    spec: &ModelDeploymentSpec,
) -> Result<ModelNeeds, SourceError> {
    needs(client, spec, None).await
}

/// What was read from sources, so that reconciles (every spec change, every
/// resync, hundreds of objects) do not refetch the same headers: a model
/// directory does not change under a URL in practice, and entries expire
/// after `ttl` for when it does. Failures are not remembered, so a source
/// that comes back is read at the next reconcile.
#[derive(Debug)]
pub struct SourceCache {
    ttl: Duration,
    entries: Mutex<HashMap<String, (Instant, SourceModel)>>,
}

impl SourceCache {
    /// An empty cache whose entries live `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// [`model_needs`], reading each source at most once per `ttl`.
    pub async fn model_needs(
        &self,
        client: &reqwest::Client,
        spec: &ModelDeploymentSpec,
    ) -> Result<ModelNeeds, SourceError> {
        needs(client, spec, Some(self)).await
    }

    fn get(&self, key: &str) -> Option<SourceModel> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .get(key)
            .filter(|(at, _)| at.elapsed() < self.ttl)
            .map(|(_, f)| f.clone())
    }

    fn put(&self, key: String, files: SourceModel) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let ttl = self.ttl;
        entries.retain(|_, (at, _)| at.elapsed() < ttl);
        entries.insert(key, (Instant::now(), files));
    }
}

/// The cache key of a source: its URL or path (and a hub source's files),
/// with the format.
fn cache_key(source: &ModelSource, format: ModelFormat) -> Option<String> {
    let place = source
        .http
        .as_ref()
        .map(|h| format!("http:{}", h.url.trim_end_matches('/')))
        .or_else(|| {
            source
                .hugging_face
                .as_ref()
                // `files` picks the file of a GGUF repository (several
                // quantizations side by side).
                .map(|h| format!("hf:{} {:?}", h.resolve_url(), h.files))
        })
        .or_else(|| {
            source
                .host_path
                .as_ref()
                .map(|h| format!("hostPath:{}", h.path))
        })?;
    Some(format!("{format:?}:{place}"))
}

async fn needs(
    client: &reqwest::Client,
    spec: &ModelDeploymentSpec,
    cache: Option<&SourceCache>,
) -> Result<ModelNeeds, SourceError> {
    let placement_min_cc = spec
        .placement
        .min_compute_capability
        .as_deref()
        .map(parse_compute_capability)
        .transpose()
        .map_err(SourceError::InvalidSizing)?;
    let input = SizingInput {
        serving: &spec.serving,
        engine: spec.engine.kind,
        placement_min_cc,
    };
    if let Some(inline) = &spec.model.sizing {
        return ModelNeeds::from_inline(inline, &input).map_err(SourceError::InvalidSizing);
    }
    let key = cache_key(&spec.model.source, spec.model.format);
    let cached = cache.zip(key.as_deref()).and_then(|(c, k)| c.get(k));
    let files = match cached {
        Some(f) => f,
        None => {
            let f = read_source(client, &spec.model.source, spec.model.format).await?;
            if let (Some(c), Some(k)) = (cache, key) {
                c.put(k, f.clone());
            }
            f
        }
    };
    match files {
        SourceModel::Safetensors(f) => ModelNeeds::from_model(&f.config, &f.headers, &input)
            .map_err(SourceError::InvalidSizing),
        SourceModel::Gguf(g) => {
            ModelNeeds::from_gguf(&g.model, &input).map_err(|source| SourceError::Sizing {
                url: g.file.clone(),
                source,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::model_deployment::{
        EngineKind, HostPathSource, HttpSource, InlineSizing, ModelSpec, PvcSource, ServingSpec,
    };
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};
    use tokio::io::AsyncWriteExt;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../tests/fixtures/{name}"))
    }

    /// (path, Range header) of each request the server saw.
    type Log = Arc<Mutex<Vec<(String, Option<String>)>>>;

    /// A tiny HTTP/1.1 server on 127.0.0.1 serving `files` with Range
    /// support (or ignoring Range, to test servers that do).
    async fn serve(files: BTreeMap<String, Vec<u8>>, honour_range: bool) -> (String, Log) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log: Log = Arc::default();
        let files = Arc::new(files);
        let log2 = log.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let files = files.clone();
                let log = log2.clone();
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut b = [0u8; 1024];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut b).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&b[..n]),
                        }
                    }
                    let text = String::from_utf8_lossy(&req).to_string();
                    let path = text.split_whitespace().nth(1).unwrap_or("/").to_string();
                    let range = text
                        .lines()
                        .find_map(|l| l.strip_prefix("range: ").or(l.strip_prefix("Range: ")))
                        .map(str::to_string);
                    log.lock().unwrap().push((path.clone(), range.clone()));
                    let name = path.rsplit('/').next().unwrap_or("");
                    let (head, body) = match files.get(name) {
                        None => ("HTTP/1.1 404 Not Found".to_string(), Vec::new()),
                        Some(data) => match range.filter(|_| honour_range) {
                            Some(r) => {
                                let (a, z) =
                                    r.trim_start_matches("bytes=").split_once('-').unwrap();
                                let a: usize = a.parse().unwrap();
                                let z: usize = z.parse::<usize>().unwrap().min(data.len() - 1);
                                (
                                    format!(
                                        "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {a}-{z}/{}",
                                        data.len()
                                    ),
                                    data[a..=z].to_vec(),
                                )
                            }
                            None => ("HTTP/1.1 200 OK".to_string(), data.clone()),
                        },
                    };
                    let head = format!(
                        "{head}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = sock.write_all(head.as_bytes()).await;
                    let _ = sock.write_all(&body).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        (format!("http://{addr}/models/tiny/"), log)
    }

    fn fixture_files(name: &str) -> BTreeMap<String, Vec<u8>> {
        ["config.json", "model.safetensors"]
            .iter()
            .map(|f| (f.to_string(), std::fs::read(fixture(name).join(f)).unwrap()))
            .collect()
    }

    fn client() -> reqwest::Client {
        reqwest::Client::builder().no_proxy().build().unwrap()
    }

    /// A safetensors file with one f16 tensor of `elems` zeros.
    fn safetensors(tensor: &str, elems: u64) -> Vec<u8> {
        let h = serde_json::json!({
            tensor: {"dtype": "F16", "shape": [elems], "data_offsets": [0, elems * 2]}
        })
        .to_string();
        let mut v = (h.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(h.as_bytes());
        v.extend(std::iter::repeat_n(0u8, (elems * 2) as usize));
        v
    }

    #[tokio::test]
    async fn the_fixture_is_read_over_http_with_two_range_requests_for_the_header() {
        let (url, log) = serve(fixture_files("tiny-llama"), true).await;
        let got = read_http(&client(), &url).await.unwrap();
        let local = read_dir(&fixture("tiny-llama")).await.unwrap();
        assert_eq!(got, local);
        assert_eq!(got.weight_files, vec!["model.safetensors"]);
        assert_eq!(got.headers[0].tensors.len(), 30);
        let log = log.lock().unwrap().clone();
        assert_eq!(
            log,
            vec![
                ("/models/tiny/config.json".to_string(), None),
                (
                    "/models/tiny/model.safetensors.index.json".to_string(),
                    None
                ),
                (
                    "/models/tiny/model.safetensors".to_string(),
                    Some("bytes=0-7".to_string())
                ),
                (
                    "/models/tiny/model.safetensors".to_string(),
                    Some("bytes=8-3079".to_string())
                ),
            ]
        );
    }

    #[tokio::test]
    async fn a_server_ignoring_range_is_still_read_for_the_header_only() {
        let (url, _) = serve(fixture_files("tiny-llama-bf16"), false).await;
        let got = read_http(&client(), &url).await.unwrap();
        let local = read_dir(&fixture("tiny-llama-bf16")).await.unwrap();
        assert_eq!(got, local);
    }

    #[tokio::test]
    async fn sharded_checkpoints_read_every_shard_named_by_the_index() {
        let mut files = fixture_files("tiny-llama");
        files.remove("model.safetensors");
        files.insert(
            "model-00001-of-00002.safetensors".into(),
            safetensors("a", 100),
        );
        files.insert(
            "model-00002-of-00002.safetensors".into(),
            safetensors("b", 50),
        );
        files.insert(
            INDEX_FILE.into(),
            serde_json::json!({"metadata": {"total_size": 300}, "weight_map": {
                "a": "model-00001-of-00002.safetensors",
                "b": "model-00002-of-00002.safetensors",
            }})
            .to_string()
            .into_bytes(),
        );
        let (url, _) = serve(files, true).await;
        let got = read_http(&client(), &url).await.unwrap();
        assert_eq!(got.headers.len(), 2);
        let s = ServingSpec::default();
        let input = SizingInput {
            serving: &s,
            engine: EngineKind::Copyhold,
            placement_min_cc: None,
        };
        let n = ModelNeeds::from_model(&got.config, &got.headers, &input).unwrap();
        assert_eq!(n.weight_bytes, 300);
    }

    #[tokio::test]
    async fn a_missing_config_names_the_url_and_status() {
        let (url, _) = serve(BTreeMap::new(), true).await;
        let e = read_http(&client(), &url).await.unwrap_err();
        assert_eq!(e.reason(), "ModelUnreadable");
        let msg = e.to_string();
        assert!(
            msg.contains("/models/tiny/config.json") && msg.contains("404"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn a_header_length_over_100_mb_is_refused_before_reading_it() {
        let mut files = fixture_files("tiny-llama");
        let mut huge = 200_000_000u64.to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        files.insert("model.safetensors".into(), huge);
        let (url, log) = serve(files, true).await;
        let e = read_http(&client(), &url).await.unwrap_err();
        assert!(
            matches!(
                e,
                SourceError::HeaderTooLarge {
                    bytes: 200_000_000,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(
            log.lock().unwrap().len(),
            3,
            "no request for the header itself"
        );
    }

    #[tokio::test]
    async fn a_truncated_weight_file_and_a_hostile_shard_name_are_errors() {
        let mut files = fixture_files("tiny-llama");
        files.insert(
            "model.safetensors".into(),
            5000u64.to_le_bytes()[..].to_vec(),
        );
        let (url, _) = serve(files.clone(), true).await;
        let e = read_http(&client(), &url).await.unwrap_err();
        assert!(
            matches!(
                e,
                SourceError::Malformed { .. } | SourceError::Status { .. }
            ),
            "{e}"
        );

        files.insert(
            INDEX_FILE.into(),
            br#"{"weight_map": {"a": "../../etc/passwd"}}"#.to_vec(),
        );
        let (url, _) = serve(files, true).await;
        let e = read_http(&client(), &url).await.unwrap_err();
        assert!(e.to_string().contains("not a plain file name"), "{e}");
    }

    #[tokio::test]
    async fn an_unreachable_server_is_a_transport_error_naming_the_url() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let e = read_http(&client(), &format!("http://{addr}/m"))
            .await
            .unwrap_err();
        assert!(matches!(e, SourceError::Transport { .. }), "{e}");
        assert!(e.to_string().contains(&addr.to_string()));
    }

    #[tokio::test]
    async fn a_server_that_never_answers_times_out_with_the_url() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((sock, _)) = listener.accept().await {
                held.push(sock);
            }
        });
        let url = format!("http://{addr}/m");
        let e = read_http_within(&client(), &url, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(e, SourceError::Transport { .. }), "{e}");
        assert!(e.to_string().contains("/m/config.json"), "{e}");
    }

    fn spec(source: ModelSource, sizing: Option<InlineSizing>) -> ModelDeploymentSpec {
        serde_json::from_value::<ModelDeploymentSpec>(serde_json::json!({
            "model": {"source": {"pvc": {"claimName": "x"}}}
        }))
        .map(|mut s| {
            s.model = ModelSpec {
                source,
                sizing,
                ..s.model
            };
            s
        })
        .unwrap()
    }

    #[tokio::test]
    async fn host_paths_on_this_machine_are_read_and_others_ask_for_inline_sizing() {
        let here = ModelSource {
            host_path: Some(HostPathSource {
                path: fixture("tiny-llama").display().to_string(),
            }),
            ..ModelSource::default()
        };
        let n = model_needs(&client(), &spec(here, None)).await.unwrap();
        assert_eq!(n.kv_bytes_per_token, 768);

        let elsewhere = ModelSource {
            host_path: Some(HostPathSource {
                path: "/nonexistent/models/llama".into(),
            }),
            ..ModelSource::default()
        };
        let e = model_needs(&client(), &spec(elsewhere, None))
            .await
            .unwrap_err();
        assert!(matches!(e, SourceError::NeedsInlineSizing { .. }));
        assert!(e.to_string().contains("spec.model.sizing"), "{e}");
    }

    #[tokio::test]
    async fn pvc_sources_use_inline_sizing_and_without_it_say_so() {
        let pvc = ModelSource {
            pvc: Some(PvcSource {
                claim_name: "models".into(),
                sub_path: None,
            }),
            ..ModelSource::default()
        };
        let e = model_needs(&client(), &spec(pvc.clone(), None))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("PVC"), "{e}");
        let inline = InlineSizing {
            weight_bytes: Some(k8s_openapi::apimachinery::pkg::api::resource::Quantity(
                "1Gi".into(),
            )),
            kv_bytes_per_token: Some(1024),
            ..InlineSizing::default()
        };
        let n = model_needs(&client(), &spec(pvc, Some(inline)))
            .await
            .unwrap();
        assert_eq!(n.weight_bytes, 1 << 30);
    }

    #[tokio::test]
    async fn the_cache_reads_a_source_once_until_its_entries_expire() {
        let (url, log) = serve(fixture_files("tiny-llama"), true).await;
        let s = spec(
            ModelSource {
                http: Some(HttpSource { url }),
                ..ModelSource::default()
            },
            None,
        );
        let cache = SourceCache::new(Duration::from_secs(600));
        let first = cache.model_needs(&client(), &s).await.unwrap();
        let requests = log.lock().unwrap().len();
        assert_eq!(requests, 4);
        let second = cache.model_needs(&client(), &s).await.unwrap();
        assert_eq!(first, second);
        assert_eq!(log.lock().unwrap().len(), requests, "served from the cache");

        let expired = SourceCache::new(Duration::ZERO);
        expired.model_needs(&client(), &s).await.unwrap();
        expired.model_needs(&client(), &s).await.unwrap();
        assert_eq!(
            log.lock().unwrap().len(),
            requests + 8,
            "read again each time"
        );
    }

    /// The tiny fixture converted by `copyhold-node gguf --type q8_0`:
    /// its tensors as gguf-py reads them hold 260 592 bytes; copyhold-node's
    /// CUDA backend holds 427 064: the Q8_0 blocks as stored (191 216), the
    /// Q8_0 embedding widened to f16 (+35 400), the f16 buffer prefill
    /// dequantizes into (the largest matrix's 37 760 values at the
    /// power-of-two capacity the node allocates, 65 536: 131 072 bytes) and
    /// the f16/f32 tensors (69 376).
    const TINY_GGUF: &str = "tiny-llama-gguf/model-q8_0.gguf";

    fn gguf_spec(source: ModelSource) -> ModelDeploymentSpec {
        let mut s = spec(source, None);
        s.model.format = ModelFormat::Gguf;
        s
    }

    #[tokio::test]
    async fn a_gguf_host_path_is_sized_from_its_header() {
        let file = fixture(TINY_GGUF);
        for path in [file.clone(), file.parent().unwrap().to_path_buf()] {
            let s = gguf_spec(ModelSource {
                host_path: Some(HostPathSource {
                    path: path.display().to_string(),
                }),
                ..ModelSource::default()
            });
            let n = model_needs(&client(), &s).await.unwrap();
            assert_eq!(n.weight_bytes, 427_064, "{path:?}");
            assert_eq!(n.num_layers, 3);
            // 3 layers × 2 KV heads × 16 × K and V × f16.
            assert_eq!(n.kv_bytes_per_token, 3 * 2 * 16 * 2 * 2);
        }
    }

    #[tokio::test]
    async fn a_gguf_on_a_mirror_is_sized_from_range_requests_for_its_header_only() {
        let data = std::fs::read(fixture(TINY_GGUF)).unwrap();
        let sums = format!("{}  model-q8_0.gguf\n", "0".repeat(64));
        let files = BTreeMap::from([
            ("model-q8_0.gguf".to_string(), data.clone()),
            ("SHA256SUMS".to_string(), sums.into_bytes()),
        ]);
        for honour_range in [true, false] {
            let (url, log) = serve(files.clone(), honour_range).await;
            let s = gguf_spec(ModelSource {
                http: Some(HttpSource { url }),
                ..ModelSource::default()
            });
            let n = model_needs(&client(), &s).await.unwrap();
            assert_eq!(n.weight_bytes, 427_064);
            assert_eq!(n.kv_bytes_per_token, 384);
            let log = log.lock().unwrap().clone();
            let ranges: Vec<_> = log.iter().filter_map(|(_, r)| r.clone()).collect();
            assert!(ranges.iter().all(|r| r.starts_with("bytes=")), "{log:?}");
            assert!(!ranges.is_empty(), "{log:?}");
        }
    }

    /// A hub-style GGUF source on the test server: `model.gguf` holding
    /// `data`, named by the directory's manifest.
    fn gguf_files(data: Vec<u8>) -> BTreeMap<String, Vec<u8>> {
        BTreeMap::from([
            ("model.gguf".to_string(), data),
            (
                "SHA256SUMS".to_string(),
                format!("{}  model.gguf\n", "0".repeat(64)).into_bytes(),
            ),
        ])
    }

    #[tokio::test]
    async fn an_8b_gguf_header_is_read_in_ranges_that_grow_to_its_end() {
        use crate::serving::gguf_header::synth;
        let header = synth::llama_8b(true, 0);
        let len = header.len();
        assert!(len > 1 << 20 && len < 2 << 20, "{len}");
        let (url, log) = serve(gguf_files(header), true).await;
        let got = gguf_source::read_http(&client(), &format!("{url}model.gguf"))
            .await
            .unwrap();
        assert_eq!(got.model.stored_bytes(), 4_912_898_048);
        let ranges: Vec<_> = log.lock().unwrap().iter().map(|l| l.1.clone()).collect();
        assert_eq!(
            ranges,
            vec![
                Some("bytes=0-1048575".to_string()),
                Some("bytes=1048576-2097151".to_string()),
            ]
        );

        // A server ignoring Range: one response, read as far as needed.
        let (url, log) = serve(gguf_files(synth::llama_8b(true, 0)), false).await;
        let again = gguf_source::read_http(&client(), &format!("{url}model.gguf"))
            .await
            .unwrap();
        assert_eq!(
            again,
            GgufSource {
                file: format!("{url}model.gguf"),
                ..got
            }
        );
        assert_eq!(log.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_malformed_or_cut_gguf_header_is_unreadable_naming_the_file() {
        let mut bad = std::fs::read(fixture(TINY_GGUF)).unwrap();
        bad[4] = 7;
        let (url, _) = serve(gguf_files(bad), true).await;
        let s = gguf_spec(ModelSource {
            http: Some(HttpSource { url: url.clone() }),
            ..ModelSource::default()
        });
        let e = model_needs(&client(), &s).await.unwrap_err();
        assert_eq!(e.reason(), "ModelUnreadable");
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("{url}model.gguf")) && msg.contains("GGUF version 7"),
            "{msg}"
        );

        let cut = std::fs::read(fixture(TINY_GGUF)).unwrap()[..5000].to_vec();
        let (url, _) = serve(gguf_files(cut), true).await;
        let s = gguf_spec(ModelSource {
            http: Some(HttpSource { url }),
            ..ModelSource::default()
        });
        let e = model_needs(&client(), &s).await.unwrap_err();
        assert!(e.to_string().contains("ends after 5000 bytes"), "{e}");
    }

    #[tokio::test]
    async fn a_gguf_header_over_100_mb_is_refused_after_one_request() {
        let mut b = b"GGUF\x03\0\0\0".to_vec();
        b.extend(0u64.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend(3u64.to_le_bytes());
        b.extend(b"tok");
        b.extend(9u32.to_le_bytes());
        b.extend(8u32.to_le_bytes());
        // 20 million strings: at least 160 MB.
        b.extend(20_000_000u64.to_le_bytes());
        let (url, log) = serve(gguf_files(b), true).await;
        let e = gguf_source::read_http(&client(), &format!("{url}model.gguf"))
            .await
            .unwrap_err();
        assert!(
            matches!(e, SourceError::GgufHeaderTooLarge { bytes, .. } if bytes > 160_000_000),
            "{e}"
        );
        assert_eq!(log.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_gguf_hub_source_must_name_its_file_and_is_read_from_resolve() {
        use crate::resources::model_deployment::HuggingFaceSource;
        let hf = |endpoint: &str, files: &[&str]| {
            gguf_spec(ModelSource {
                hugging_face: Some(HuggingFaceSource {
                    repo: "town/llama-gguf".into(),
                    revision: "main".into(),
                    files: files.iter().map(|f| f.to_string()).collect(),
                    token_secret: None,
                    endpoint: Some(endpoint.into()),
                }),
                ..ModelSource::default()
            })
        };
        let e = model_needs(&client(), &hf("http://127.0.0.1:9", &["*.gguf"]))
            .await
            .unwrap_err();
        assert!(matches!(e, SourceError::NeedsGgufFile { .. }), "{e}");
        assert!(e.to_string().contains("files: [model-Q4_K_M.gguf]"), "{e}");

        let data = std::fs::read(fixture(TINY_GGUF)).unwrap();
        let (url, log) = serve(gguf_files(data), true).await;
        let base = url.trim_end_matches("/models/tiny/");
        let n = model_needs(&client(), &hf(base, &["model.gguf", "README.md"]))
            .await
            .unwrap();
        assert_eq!(n.weight_bytes, 427_064);
        let log = log.lock().unwrap().clone();
        assert_eq!(log[0].0, "/town/llama-gguf/resolve/main/model.gguf");
    }

    #[tokio::test]
    async fn the_cache_tells_two_gguf_files_of_one_repository_apart() {
        use crate::resources::model_deployment::HuggingFaceSource;
        use crate::serving::gguf_header::synth;
        let mut files = gguf_files(std::fs::read(fixture(TINY_GGUF)).unwrap());
        files.insert("big.gguf".into(), synth::llama_8b(true, 0));
        let (url, _) = serve(files, true).await;
        let base = url.trim_end_matches("/models/tiny/");
        let hf = |file: &str| {
            gguf_spec(ModelSource {
                hugging_face: Some(HuggingFaceSource {
                    repo: "town/two".into(),
                    revision: "main".into(),
                    files: vec![file.into()],
                    token_secret: None,
                    endpoint: Some(base.into()),
                }),
                ..ModelSource::default()
            })
        };
        let cache = SourceCache::new(Duration::from_secs(600));
        let small = cache
            .model_needs(&client(), &hf("model.gguf"))
            .await
            .unwrap();
        let big = cache.model_needs(&client(), &hf("big.gguf")).await.unwrap();
        assert_eq!(small.weight_bytes, 427_064);
        assert_eq!(big.num_layers, 32);
    }

    #[tokio::test]
    async fn an_http_spec_is_sized_from_the_server() {
        let (url, _) = serve(fixture_files("tiny-llama-bf16"), true).await;
        let mut s = spec(
            ModelSource {
                http: Some(HttpSource { url }),
                ..ModelSource::default()
            },
            None,
        );
        s.engine.kind = EngineKind::Vllm;
        let n = model_needs(&client(), &s).await.unwrap();
        assert_eq!(n.min_compute_capability, (8, 0));
        assert_eq!(n.kv_bytes_per_token, 384);
    }
}
