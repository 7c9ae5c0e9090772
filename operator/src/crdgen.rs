//! `copyhold crdgen`: write `crds/*.yaml` from the Rust types.

use std::path::Path;

use crate::resources::{crd_yaml, crds};

/// Errors writing CRDs.
#[derive(Debug, thiserror::Error)]
pub enum CrdgenError {
    #[error("serializing CRD {name}: {source}")]
    Serialize {
        name: &'static str,
        source: serde_saphyr::SerializeError,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// Write every CRD into `dir`, or print them all (as one multi-document
/// stream) when `dir` is `None`.
pub fn run(dir: Option<&Path>) -> Result<(), CrdgenError> {
    let mut all = String::new();
    for (name, crd) in crds() {
        let text = crd_yaml(&crd).map_err(|source| CrdgenError::Serialize { name, source })?;
        match dir {
            Some(dir) => {
                let path = dir.join(name);
                std::fs::create_dir_all(dir)
                    .and_then(|_| std::fs::write(&path, &text))
                    .map_err(|source| CrdgenError::Write {
                        path: path.display().to_string(),
                        source,
                    })?;
            }
            None => {
                all.push_str("---\n");
                all.push_str(&text);
            }
        }
    }
    if dir.is_none() {
        print!("{all}");
    }
    Ok(())
}
