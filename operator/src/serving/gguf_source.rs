//! Reads a GGUF model's header from its source for sizing
//! ([`crate::serving::gguf_header`] parses it): range requests that grow
//! until the tensor infos are complete, or the start of a local file.
//!
//! Which file:
//! - `huggingFace`: the one `.gguf` name in `files` (as the Pod's fetch
//!   takes it), read from `ENDPOINT/REPO/resolve/REVISION/FILE` (the LFS
//!   redirect is followed with `Range` kept);
//! - `http`: the one `.gguf` file the directory's `SHA256SUMS` manifest
//!   names (the manifest the node's fetch reads too);
//! - `hostPath`: the path itself when it is a `.gguf` file, or the one
//!   `.gguf` file of the directory (as `copyhold-node` finds it).
//!
//! The first read is 1 MiB; each next one asks for what the parser says it
//! needs at least, and at least doubles what was read. A Llama 3 header
//! (7.8 MB, mostly the tokenizer) takes four requests. A server that
//! ignores `Range` sends the whole file: it is read from that one response
//! only as far as the header goes, then dropped. Headers over
//! [`MAX_GGUF_HEADER_BYTES`] are refused.

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{CONTENT_RANGE, RANGE};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::resources::model_deployment::ModelSource;
use crate::serving::gguf_header::{self, GgufHeader, GgufModel, Parsed};
use crate::serving::model_source::{REQUEST_TIMEOUT, SourceError};

/// Largest GGUF header read: the biggest tokenizers (256 000 tokens with
/// merges) take tens of megabytes.
pub const MAX_GGUF_HEADER_BYTES: u64 = 100_000_000;
/// Bytes asked for first: the whole header of a model without a large
/// tokenizer.
pub const FIRST_READ_BYTES: u64 = 1 << 20;
/// The manifest of an `http` source's directory.
pub const MANIFEST: &str = copyhold_hub::fetch::MANIFEST;

/// A GGUF model as read from its source, with the file it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufSource {
    /// URL or path of the `.gguf` file.
    pub file: String,
    pub model: GgufModel,
}

/// The start of a file, read further on demand.
enum Prefix<'a> {
    Http {
        client: &'a reqwest::Client,
        url: String,
        timeout: Duration,
        /// The whole-file response of a server that ignored `Range`.
        whole: Option<reqwest::Response>,
    },
    File(PathBuf),
}

impl Prefix<'_> {
    fn name(&self) -> String {
        match self {
            Prefix::Http { url, .. } => url.clone(),
            Prefix::File(p) => p.display().to_string(),
        }
    }

    /// Appends bytes to `buf` until it holds `want` or the file ends;
    /// returns whether the file ended.
    async fn extend(&mut self, buf: &mut Vec<u8>, want: u64) -> Result<bool, SourceError> {
        match self {
            Prefix::File(path) => extend_file(path, buf, want).await,
            Prefix::Http {
                client,
                url,
                timeout,
                whole,
            } => {
                if whole.is_none() {
                    match ranged(client, url, *timeout, buf, want).await? {
                        Ranged::Done(ended) => return Ok(ended),
                        Ranged::Whole(resp) => *whole = Some(resp),
                    }
                }
                let Some(resp) = whole.as_mut() else {
                    return Ok(true);
                };
                read_on(resp, url, buf, want).await
            }
        }
    }
}

/// What a range request gave.
enum Ranged {
    /// The range was appended; `true` when the file ended within it.
    Done(bool),
    /// The server sent the whole file (200): the caller reads it on.
    Whole(reqwest::Response),
}

async fn ranged(
    client: &reqwest::Client,
    url: &str,
    timeout: Duration,
    buf: &mut Vec<u8>,
    want: u64,
) -> Result<Ranged, SourceError> {
    let start = buf.len() as u64;
    let end = want.saturating_sub(1);
    let mut resp = client
        .get(url)
        .header(RANGE, format!("bytes={start}-{end}"))
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| transport(url, e))?;
    match resp.status() {
        StatusCode::PARTIAL_CONTENT => {
            let cr = resp
                .headers()
                .get(CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !cr.is_empty() && !cr.starts_with(&format!("bytes {start}-")) {
                return Err(SourceError::Malformed {
                    url: url.to_string(),
                    message: format!("asked for bytes {start}-{end}, got `{cr}`"),
                });
            }
            while let Some(chunk) = resp.chunk().await.map_err(|e| transport(url, e))? {
                buf.extend_from_slice(&chunk);
            }
            Ok(Ranged::Done((buf.len() as u64) < want))
        }
        // Past the end of the file.
        StatusCode::RANGE_NOT_SATISFIABLE => Ok(Ranged::Done(true)),
        StatusCode::OK => {
            // The body starts at byte 0: drop what is already here.
            let mut skip = start;
            while skip > 0 {
                let Some(chunk) = resp.chunk().await.map_err(|e| transport(url, e))? else {
                    return Ok(Ranged::Done(true));
                };
                let n = (chunk.len() as u64).min(skip);
                skip -= n;
                buf.extend_from_slice(&chunk[n as usize..]);
            }
            Ok(Ranged::Whole(resp))
        }
        s => Err(SourceError::Status {
            url: url.to_string(),
            status: s.as_u16(),
        }),
    }
}

/// Reads on in a whole-file response until `buf` holds `want` bytes.
async fn read_on(
    resp: &mut reqwest::Response,
    url: &str,
    buf: &mut Vec<u8>,
    want: u64,
) -> Result<bool, SourceError> {
    while (buf.len() as u64) < want {
        match resp.chunk().await.map_err(|e| transport(url, e))? {
            Some(chunk) => buf.extend_from_slice(&chunk),
            None => return Ok(true),
        }
    }
    Ok(false)
}

async fn extend_file(path: &Path, buf: &mut Vec<u8>, want: u64) -> Result<bool, SourceError> {
    let io = |e: std::io::Error| SourceError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let mut f = tokio::fs::File::open(path).await.map_err(io)?;
    let start = buf.len() as u64;
    f.seek(std::io::SeekFrom::Start(start)).await.map_err(io)?;
    let more = want.saturating_sub(start);
    let got = (&mut f).take(more).read_to_end(buf).await.map_err(io)?;
    Ok((got as u64) < more)
}

fn transport(url: &str, e: reqwest::Error) -> SourceError {
    SourceError::Transport {
        url: url.to_string(),
        message: e.to_string(),
    }
}

/// Reads the header, asking for more bytes until it is complete.
async fn read_header(prefix: &mut Prefix<'_>) -> Result<GgufHeader, SourceError> {
    let name = prefix.name();
    let mut buf = Vec::new();
    let mut ended = false;
    loop {
        let need = match gguf_header::parse(&buf) {
            Ok(Parsed::Header(h)) => return Ok(h),
            Ok(Parsed::NeedBytes(n)) => n,
            Err(source) => return Err(SourceError::Gguf { url: name, source }),
        };
        if need > MAX_GGUF_HEADER_BYTES {
            return Err(SourceError::GgufHeaderTooLarge {
                url: name,
                bytes: need,
            });
        }
        if ended {
            return Err(SourceError::Malformed {
                url: name,
                message: format!(
                    "the file ends after {} bytes, inside its GGUF header (which needs at least {need})",
                    buf.len()
                ),
            });
        }
        // `need` is at most the limit (checked above).
        let want = need
            .max(2 * buf.len() as u64)
            .clamp(FIRST_READ_BYTES, MAX_GGUF_HEADER_BYTES);
        ended = prefix.extend(&mut buf, want).await?;
    }
}

/// Reads the header of the GGUF file at `url` over HTTP.
pub async fn read_http(client: &reqwest::Client, url: &str) -> Result<GgufSource, SourceError> {
    read_http_within(client, url, REQUEST_TIMEOUT).await
}

async fn read_http_within(
    client: &reqwest::Client,
    url: &str,
    timeout: Duration,
) -> Result<GgufSource, SourceError> {
    let mut p = Prefix::Http {
        client,
        url: url.to_string(),
        timeout,
        whole: None,
    };
    model_of(url, read_header(&mut p).await?)
}

/// Reads the header of a local GGUF file.
pub async fn read_file(path: &Path) -> Result<GgufSource, SourceError> {
    let name = path.display().to_string();
    model_of(
        &name,
        read_header(&mut Prefix::File(path.to_path_buf())).await?,
    )
}

fn model_of(file: &str, h: GgufHeader) -> Result<GgufSource, SourceError> {
    let model = GgufModel::from_header(&h).map_err(|source| SourceError::Gguf {
        url: file.to_string(),
        source,
    })?;
    Ok(GgufSource {
        file: file.to_string(),
        model,
    })
}

/// The one `.gguf` name among `names`, or an error saying what was found.
fn one_gguf<'a>(names: impl Iterator<Item = &'a str>, where_: &str) -> Result<&'a str, String> {
    let found: Vec<&str> = names.filter(|n| n.ends_with(".gguf")).collect();
    match found.as_slice() {
        [one] => Ok(one),
        [] => Err(format!("{where_} names no .gguf file")),
        many => Err(format!(
            "{where_} names {} .gguf files ({}): serve one model per source",
            many.len(),
            many.join(", ")
        )),
    }
}

/// A path from outside: plain `/`-separated parts, none `..` or hidden.
fn plain_relative(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && path
            .split('/')
            .all(|p| !p.is_empty() && !p.starts_with('.') && !p.contains('\\'))
}

/// The `.gguf` file an `http` source's `SHA256SUMS` names.
async fn mirror_file(client: &reqwest::Client, base: &str) -> Result<String, SourceError> {
    let url = format!("{base}/{MANIFEST}");
    let resp = client
        .get(&url)
        .timeout(REQUEST_TIMEOUT)
        .send()
        .await
        .map_err(|e| transport(&url, e))?;
    if !resp.status().is_success() {
        return Err(SourceError::Status {
            url,
            status: resp.status().as_u16(),
        });
    }
    let text = resp.text().await.map_err(|e| transport(&url, e))?;
    let entries =
        copyhold_hub::fetch::parse_manifest(&text).map_err(|message| SourceError::Malformed {
            url: url.clone(),
            message,
        })?;
    let file =
        one_gguf(entries.iter().map(|(_, p)| p.as_str()), "the manifest").map_err(|message| {
            SourceError::Malformed {
                url: url.clone(),
                message,
            }
        })?;
    if !plain_relative(file) {
        return Err(SourceError::Malformed {
            url,
            message: format!("`{file}` is not a plain relative path"),
        });
    }
    Ok(format!("{base}/{file}"))
}

/// The `.gguf` file of a hostPath: the path, or the one in its directory.
async fn host_file(path: &Path) -> Result<PathBuf, SourceError> {
    let io = |e: std::io::Error| SourceError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    if tokio::fs::metadata(path).await.map_err(io)?.is_file() {
        return Ok(path.to_path_buf());
    }
    let mut names = Vec::new();
    let mut dir = tokio::fs::read_dir(path).await.map_err(io)?;
    while let Some(e) = dir.next_entry().await.map_err(io)? {
        names.push(e.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    let one = one_gguf(names.iter().map(String::as_str), "the directory").map_err(|message| {
        SourceError::Malformed {
            url: path.display().to_string(),
            message,
        }
    })?;
    Ok(path.join(one))
}

/// Reads the GGUF header of the spec's source, if the controller can.
pub async fn read_source(
    client: &reqwest::Client,
    source: &ModelSource,
) -> Result<GgufSource, SourceError> {
    if let Some(h) = &source.http {
        let file = mirror_file(client, h.url.trim_end_matches('/')).await?;
        return read_http(client, &file).await;
    }
    if let Some(hf) = &source.hugging_face {
        let literal = hf
            .files
            .iter()
            .filter(|f| !f.contains(['*', '?', '[']))
            .map(String::as_str);
        let file = one_gguf(literal, "spec.model.source.huggingFace.files")
            .ok()
            .filter(|f| plain_relative(f))
            .ok_or_else(|| SourceError::NeedsGgufFile {
                files: hf.files.clone(),
            })?;
        return read_http(client, &format!("{}/{file}", hf.resolve_url())).await;
    }
    if let Some(h) = &source.host_path {
        let path = Path::new(&h.path);
        if tokio::fs::metadata(path).await.is_err() {
            return Err(SourceError::NeedsInlineSizing {
                what: format!(
                    "hostPath {} does not exist on the controller's machine",
                    h.path
                ),
            });
        }
        return read_file(&host_file(path).await?).await;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serving::gguf_header::synth;

    #[test]
    fn one_gguf_name_is_taken_and_none_or_two_are_errors_naming_them() {
        let names = ["config.json", "m-Q4_K_M.gguf"];
        assert_eq!(one_gguf(names.into_iter(), "x"), Ok("m-Q4_K_M.gguf"));
        let e = one_gguf(["a.gguf", "b.gguf"].into_iter(), "the manifest").unwrap_err();
        assert!(e.contains("2 .gguf files (a.gguf, b.gguf)"), "{e}");
        assert!(one_gguf(["x.json"].into_iter(), "x").is_err());
        assert!(!plain_relative("../etc/passwd.gguf"));
        assert!(!plain_relative("/abs.gguf"));
        assert!(plain_relative("q4/model.gguf"));
    }

    #[tokio::test]
    async fn a_local_8b_header_is_read_in_growing_steps_to_its_end() {
        let dir = std::env::temp_dir().join(format!("copyhold-gguf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("llama-8b-Q4_K_M.gguf");
        let header = synth::llama_8b(true, 0);
        std::fs::write(&path, &header).unwrap();
        let got = read_file(&path).await.unwrap();
        assert_eq!(got.model.stored_bytes(), 4_912_898_048);
        assert_eq!(host_file(&dir).await.unwrap(), path);

        // Cut inside the tensor infos: the file ends inside its header.
        std::fs::write(&path, &header[..header.len() - 100]).unwrap();
        let e = read_file(&path).await.unwrap_err();
        assert!(e.to_string().contains("inside its GGUF header"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
