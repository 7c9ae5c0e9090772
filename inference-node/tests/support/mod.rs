//! What the node's tests share: where the fixture models are.

use std::path::PathBuf;

/// The tiny fixture models with reference outputs (`tests/fixtures` at the
/// repository's root, or `COPYHOLD_FIXTURES`). Panics naming the path it
/// looked for when they are not there, rather than failing later with a
/// bare "No such file or directory".
pub fn fixtures() -> PathBuf {
    let dir = match std::env::var_os("COPYHOLD_FIXTURES") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures"),
    };
    assert!(
        dir.join("tiny-llama/config.json").is_file(),
        "fixture models not found: looked for {}/tiny-llama/config.json (set COPYHOLD_FIXTURES to their folder)",
        dir.display()
    );
    dir
}
