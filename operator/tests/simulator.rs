//! `copyhold simulate budget` on the shipped example days: the JSON has the
//! documented shape, and what must hold by construction holds (no step is
//! reversed within its dwell; energy figures are consistent). The goals
//! (≥ 99.5 % within allowance, more renewable energy than the static cap)
//! are measured and reported in bench/results/energy-simulator.md.

use std::process::Command;

use anyhow::{Context as _, Result};

fn simulate(supply: &str, extra: &[&str]) -> Result<std::process::Output> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    Command::new(env!("CARGO_BIN_EXE_copyhold"))
        .args(["simulate", "budget", "--budget"])
        .arg(root.join("examples/energy/energy-budget.yaml"))
        .arg("--supply")
        .arg(root.join("examples/energy").join(supply))
        .arg("--demand")
        .arg(root.join("examples/energy/demand.csv"))
        .args(extra)
        .output()
        .context("running copyhold simulate budget")
}

const KEYS: [&str; 7] = [
    "within_allowance_pct",
    "renewable_used_wh",
    "renewable_available_wh",
    "over_allowance_wh",
    "requests_deferred",
    "transitions",
    "reversals_within_dwell",
];

#[test]
fn both_example_days_simulate_with_the_documented_json_and_no_reversal() -> Result<()> {
    for day in ["supply-sunny.csv", "supply-cloudy.csv"] {
        let out = simulate(day, &["--json"])?;
        assert!(
            out.status.success(),
            "{day}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        for k in KEYS {
            assert!(v[k].is_number(), "{day}: {k} missing in {v}");
            for b in ["no_ladder", "static_cap"] {
                assert!(
                    v["baselines"][b][k].is_number(),
                    "{day}: baselines.{b}.{k} in {v}"
                );
            }
        }
        assert_eq!(v["reversals_within_dwell"], 0, "{day}: {v}");
        let pct = v["within_allowance_pct"].as_f64().unwrap_or(-1.0);
        assert!((0.0..=100.0).contains(&pct), "{day}: {v}");
        let used = v["renewable_used_wh"].as_f64().unwrap_or(-1.0);
        let avail = v["renewable_available_wh"].as_f64().unwrap_or(-1.0);
        assert!(used >= 0.0 && used <= avail + 0.5, "{day}: {v}");
        // Same supply for all three.
        assert_eq!(
            v["baselines"]["no_ladder"]["renewable_available_wh"],
            v["renewable_available_wh"]
        );
        // Without a ladder nothing changes step or is deferred.
        assert_eq!(v["baselines"]["no_ladder"]["transitions"], 0);
        assert_eq!(v["baselines"]["no_ladder"]["requests_deferred"], 0);
        assert!(v["power_limit_changes"].is_number(), "{day}: {v}");
    }
    Ok(())
}

/// The goals, on both example days: ≥ 99.5 % of the time within
/// the allowance, no reversal within the dwell, and more renewable energy
/// used than the static cap at the day's mean supply.
#[test]
fn the_ladder_meets_the_goals_on_both_example_days() -> Result<()> {
    for day in ["supply-sunny.csv", "supply-cloudy.csv"] {
        let out = simulate(day, &["--json"])?;
        assert!(out.status.success(), "{day}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let f = |x: &serde_json::Value| x.as_f64().unwrap_or(f64::NAN);
        assert!(f(&v["within_allowance_pct"]) >= 99.5, "{day}: {v}");
        assert_eq!(v["reversals_within_dwell"], 0, "{day}: {v}");
        assert!(
            f(&v["renewable_used_wh"]) > f(&v["baselines"]["static_cap"]["renewable_used_wh"]),
            "{day}: {v}"
        );
    }
    Ok(())
}

#[test]
fn the_table_names_both_baselines() -> Result<()> {
    let out = simulate("supply-sunny.csv", &[])?;
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for s in [
        "ladder",
        "no ladder",
        "static cap",
        "time within allowance (%)",
        "reversals within dwell",
    ] {
        assert!(text.contains(s), "{s} missing:\n{text}");
    }
    Ok(())
}

#[test]
fn a_bad_csv_is_refused_with_its_line_number() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("copyhold-sim-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let bad = dir.join("bad.csv");
    std::fs::write(
        &bad,
        "time,watts\n2025-06-21T00:00:00Z,100\n2025-06-21T00:01:00Z,lots\n",
    )?;
    let out = simulate(bad.to_str().context("utf-8 path")?, &[])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.csv:3:") && err.contains("lots"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
