//! check-golden on the shared fixtures, and proof that it can fail.

mod support;

use std::path::{Path, PathBuf};

use copyhold_node::golden::check;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("copyhold-golden-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn the_f32_fixture_matches_hf_logits_and_greedy_tokens() {
    let r = check(&support::fixtures().join("tiny-llama")).unwrap();
    assert!(r.ok, "{r:?}");
    assert!(r.max_abs_logit_diff <= 1e-4 && r.greedy_match && r.cases_run > 0 && r.chat_run);
}

#[test]
fn the_bf16_fixture_matches_hf_logits_and_greedy_tokens() {
    let r = check(&support::fixtures().join("tiny-llama-bf16")).unwrap();
    assert!(r.ok, "{r:?}");
    assert!(r.max_abs_logit_diff <= 1e-4 && r.greedy_match && r.cases_run > 0 && r.chat_run);
}

#[test]
fn a_golden_logit_off_by_a_thousandth_fails_the_check() {
    let dir = scratch("logit");
    copy_dir(&support::fixtures().join("tiny-llama"), &dir);
    let p = dir.join("golden.json");
    let mut g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    let x = g["cases"][0]["last_logits"][7].as_f64().unwrap();
    g["cases"][0]["last_logits"][7] = serde_json::json!(x + 1e-3);
    std::fs::write(&p, g.to_string()).unwrap();
    let r = check(&dir).unwrap();
    assert!(
        !r.ok && r.greedy_match && r.max_abs_logit_diff > 9e-4,
        "{r:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_different_greedy_token_fails_the_check() {
    let dir = scratch("greedy");
    copy_dir(&support::fixtures().join("tiny-llama-bf16"), &dir);
    let p = dir.join("golden.json");
    let mut g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    let t = g["chat"]["greedy_continuation_ids"][5].as_u64().unwrap();
    g["chat"]["greedy_continuation_ids"][5] = serde_json::json!((t + 1) % 590);
    std::fs::write(&p, g.to_string()).unwrap();
    let r = check(&dir).unwrap();
    assert!(!r.ok && !r.greedy_match, "{r:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_binary_prints_one_json_line_and_exits_non_zero_on_mismatch() {
    let bin = env!("CARGO_BIN_EXE_copyhold-node");
    let out = std::process::Command::new(bin)
        .arg("check-golden")
        .arg(support::fixtures().join("tiny-llama"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1);
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["greedy_match"], true);
    assert!(v["max_abs_logit_diff"].as_f64().unwrap() <= 1e-4);
    assert!(v["cases_run"].as_u64().unwrap() >= 1);

    let dir = scratch("bin");
    copy_dir(&support::fixtures().join("tiny-llama"), &dir);
    let p = dir.join("golden.json");
    let mut g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    g["cases"][1]["greedy_continuation_ids"][0] = serde_json::json!(3);
    std::fs::write(&p, g.to_string()).unwrap();
    let out = std::process::Command::new(bin)
        .arg("check-golden")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    std::fs::remove_dir_all(&dir).unwrap();
}
