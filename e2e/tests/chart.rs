//! The Helm chart: lints clean, renders for several value sets, refuses bad
//! values with the schema's message, and carries the current CRDs.

use std::path::PathBuf;
use std::process::{Command, Output};

use anyhow::{Context, Result};
use copyhold_e2e::workspace_root;

fn helm() -> Result<PathBuf> {
    let cache = std::env::var_os("COPYHOLD_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/copyhold")))
        .context("no HOME")?;
    let helm = cache.join("bin/helm");
    if !helm.exists() {
        // `e2e/cluster.sh tools` fetches helm with the rest.
        let st = Command::new("bash")
            .arg(workspace_root().join("e2e/cluster.sh"))
            .arg("tools")
            .status()?;
        anyhow::ensure!(st.success(), "e2e/cluster.sh tools failed");
    }
    Ok(helm)
}

fn run_helm(args: &[&str]) -> Result<Output> {
    Ok(Command::new(helm()?)
        .args(args)
        .current_dir(workspace_root())
        .output()?)
}

#[test]
fn the_chart_lints_clean() -> Result<()> {
    let out = run_helm(&["lint", "charts/copyhold", "--strict"])?;
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn the_chart_renders_for_several_value_sets() -> Result<()> {
    let sets: [&[&str]; 3] = [
        &[],
        &[
            "--set",
            "controller.replicas=1",
            "--set",
            "controller.leaderElection=false",
        ],
        &[
            "--set",
            "controller.watchNamespace=town",
            "--set",
            "serviceMonitor.enabled=true",
        ],
    ];
    for set in sets {
        let mut args = vec![
            "template",
            "copyhold",
            "charts/copyhold",
            "-n",
            "copyhold-system",
        ];
        args.extend_from_slice(set);
        let out = run_helm(&args)?;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{set:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("kind: Deployment") && text.contains("kind: ClusterRole"),
            "{set:?}"
        );
        assert!(
            text.contains("runAsNonRoot: true") && text.contains("readOnlyRootFilesystem: true")
        );
        assert!(
            text.contains("type: RuntimeDefault")
                && text.contains("allowPrivilegeEscalation: false")
        );
        assert!(!text.contains("\"*\""), "no wildcard verbs or resources");
        if set.contains(&"controller.watchNamespace=town") {
            assert!(text.contains("--watch-namespace=town"), "{text}");
            assert!(text.contains("kind: ServiceMonitor"));
        } else {
            assert!(!text.contains("kind: ServiceMonitor"));
        }
    }
    Ok(())
}

#[test]
fn bad_values_fail_with_the_schema_message() -> Result<()> {
    let out = run_helm(&[
        "template",
        "copyhold",
        "charts/copyhold",
        "--set",
        "controller.replicas=0",
    ])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/controller/replicas") && err.contains("minimum"),
        "{err}"
    );
    let out = run_helm(&[
        "template",
        "copyhold",
        "charts/copyhold",
        "--set",
        "controller.bogus=1",
    ])?;
    assert!(!out.status.success(), "unknown keys are refused");
    Ok(())
}

#[test]
fn the_chart_carries_the_current_crds() -> Result<()> {
    let root = workspace_root();
    for entry in std::fs::read_dir(root.join("crds"))? {
        let path = entry?.path();
        let name = path.file_name().context("file name")?;
        let chart_copy = root.join("charts/copyhold/crds").join(name);
        assert_eq!(
            std::fs::read_to_string(&path)?,
            std::fs::read_to_string(&chart_copy).unwrap_or_default(),
            "charts/copyhold/crds/{} differs from crds/: run `make crds`",
            name.to_string_lossy()
        );
    }
    Ok(())
}
