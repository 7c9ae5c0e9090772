//! The three resources against a real API server: CRDs install, examples
//! apply, invalid manifests are refused with their message, and kubectl shows
//! what a person needs (printer columns, explain, scale).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use copyhold::resources::{EnergyBudget, ModelDeployment, StintQuota};
use copyhold_e2e::{
    TestNamespace, eventually, expected_message, install_crds, kubectl, kubectl_ok, manifests,
    workspace_root,
};
use k8s_openapi::api::core::v1::ResourceQuota;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::ApiResource;
use kube::{CustomResourceExt, Resource};

fn api_resource(kind: &str) -> Result<(ApiResource, bool)> {
    Ok(match kind {
        "ModelDeployment" => (ApiResource::erase::<ModelDeployment>(&()), true),
        "EnergyBudget" => (ApiResource::erase::<EnergyBudget>(&()), false),
        "StintQuota" => (ApiResource::erase::<StintQuota>(&()), true),
        other => bail!("not a copyhold kind: {other}"),
    })
}

/// Send a manifest to the API server as it is, returning the server's answer.
async fn create(
    client: &kube::Client,
    ns: &str,
    path: &Path,
) -> Result<std::result::Result<DynamicObject, String>> {
    let text = std::fs::read_to_string(path)?;
    let mut obj: DynamicObject =
        serde_saphyr::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let kind = obj
        .types
        .as_ref()
        .map(|t| t.kind.clone())
        .unwrap_or_default();
    let (ar, namespaced) = api_resource(&kind)?;
    let api: Api<DynamicObject> = if namespaced {
        obj.metadata.namespace = Some(ns.to_owned());
        Api::namespaced_with(client.clone(), ns, &ar)
    } else {
        Api::all_with(client.clone(), &ar)
    };
    match api.create(&PostParams::default(), &obj).await {
        Ok(o) => Ok(Ok(o)),
        Err(kube::Error::Api(status)) => Ok(Err(status.message)),
        Err(e) => Err(e.into()),
    }
}

#[tokio::test]
async fn crds_install_and_become_established() -> Result<()> {
    install_crds().await?;
    for name in [
        "modeldeployments.copyhold.dev",
        "energybudgets.copyhold.dev",
        "stintquotas.copyhold.dev",
    ] {
        let status = kubectl_ok(&[
            "get",
            "crd",
            name,
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Established\")].status}",
        ])?;
        assert_eq!(status, "True", "{name} not established");
    }
    let names = kubectl_ok(&[
        "get",
        "crd",
        "modeldeployments.copyhold.dev",
        "-o",
        "jsonpath={.spec.names}",
    ])?;
    assert!(
        names.contains("\"md\"") && names.contains("\"copyhold\""),
        "short name and category: {names}"
    );
    Ok(())
}

#[tokio::test]
async fn every_example_applies_and_is_valid_for_the_operator() -> Result<()> {
    install_crds().await?;
    let ns = TestNamespace::create("examples")?;
    let examples = manifests(&workspace_root().join("examples"))?;
    assert!(examples.len() >= 3, "examples/ has the three resources");
    for file in &examples {
        let f = file.to_string_lossy();
        let out = kubectl(&["apply", "-n", &ns.name, "-f", &f])?;
        assert!(
            out.status.success(),
            "{f} did not apply: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for report in copyhold::validation::validate_file(file)? {
            assert!(
                report.errors.is_empty(),
                "{f}: {} {}: {:?}",
                report.kind,
                report.name,
                report.errors
            );
        }
    }
    let got = kubectl_ok(&["get", "md,sq", "-n", &ns.name, "-o", "name"])?;
    assert!(
        got.contains("modeldeployment.copyhold.dev/qwen2-5-0-5b-instruct"),
        "{got}"
    );
    assert!(
        got.contains("stintquota.copyhold.dev/coop-members"),
        "{got}"
    );
    kubectl_ok(&["get", "eb", "rooftop-solar"])?;
    Ok(())
}

#[tokio::test]
async fn every_invalid_manifest_is_refused_by_the_api_server_with_its_message() -> Result<()> {
    install_crds().await?;
    let client = copyhold_e2e::client().await?;
    let ns = TestNamespace::create("invalid")?;
    let files = manifests(&workspace_root().join("tests/invalid"))?;
    assert!(
        files.len() >= 12,
        "at least 12 invalid manifests, found {}",
        files.len()
    );
    let mut failures = Vec::new();
    for file in &files {
        let expect = expected_message(file)?;
        match create(&client, &ns.name, file).await? {
            Ok(_) => failures.push(format!(
                "{}: accepted, expected refusal with `{expect}`",
                file.display()
            )),
            Err(msg) if msg.contains(&expect) => {}
            Err(msg) => failures.push(format!(
                "{}: refused with `{msg}`, expected `{expect}`",
                file.display()
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

#[tokio::test]
async fn what_the_schema_cannot_say_the_operator_refuses() -> Result<()> {
    install_crds().await?;
    let client = copyhold_e2e::client().await?;
    let ns = TestNamespace::create("semantic")?;
    let files = manifests(&workspace_root().join("tests/invalid/operator"))?;
    assert!(!files.is_empty());
    for file in &files {
        let expect = expected_message(file)?;
        let reports = copyhold::validation::validate_file(file)?;
        let errors: Vec<String> = reports.into_iter().flat_map(|r| r.errors).collect();
        assert!(
            errors.iter().any(|e| e.contains(&expect)),
            "{}: operator said {errors:?}, expected `{expect}`",
            file.display()
        );
        // The 1.20 server's schema cannot express these (no CEL there), so it
        // stores them; the operator's condition is what tells the user.
        if let Ok(obj) = create(&client, &ns.name, file).await? {
            let (ar, namespaced) = api_resource(
                &obj.types
                    .as_ref()
                    .map(|t| t.kind.clone())
                    .unwrap_or_default(),
            )?;
            let api: Api<DynamicObject> = if namespaced {
                Api::namespaced_with(client.clone(), &ns.name, &ar)
            } else {
                Api::all_with(client.clone(), &ar)
            };
            api.delete(
                &obj.metadata.name.clone().unwrap_or_default(),
                &Default::default(),
            )
            .await?;
        }
    }
    Ok(())
}

#[tokio::test]
async fn kubectl_get_shows_the_printer_columns_from_status() -> Result<()> {
    install_crds().await?;
    let client = copyhold_e2e::client().await?;
    let ns = TestNamespace::create("columns")?;
    kubectl_ok(&[
        "apply",
        "-n",
        &ns.name,
        "-f",
        "examples/model-deployment.yaml",
        "-f",
        "examples/stint-quota.yaml",
    ])?;

    // Write a status as the controller would (server-side apply on /status).
    let md: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let status = serde_json::json!({
        "apiVersion": "copyhold.dev/v1alpha1", "kind": "ModelDeployment",
        "status": {"servedModelName": "qwen2.5-0.5b-instruct", "readyReplicas": 1, "replicas": 2,
                   "gpuClass": "Tesla-P40", "state": "Ready", "observedGeneration": 1}
    });
    md.patch_status(
        "qwen2-5-0-5b-instruct",
        &PatchParams::apply("copyhold-e2e").force(),
        &Patch::Apply(&status),
    )
    .await?;
    let sq: Api<StintQuota> = Api::namespaced(client.clone(), &ns.name);
    let status = serde_json::json!({
        "apiVersion": "copyhold.dev/v1alpha1", "kind": "StintQuota",
        "status": {"memberCount": 3, "periodDescription": "calendar month (Europe/Berlin)",
                   "resetsAt": "2026-12-01T00:00:00Z", "state": "Ok"}
    });
    sq.patch_status(
        "coop-members",
        &PatchParams::apply("copyhold-e2e").force(),
        &Patch::Apply(&status),
    )
    .await?;

    let out = kubectl_ok(&["get", "md", "-n", &ns.name])?;
    let header = out.lines().next().unwrap_or_default();
    for col in [
        "NAME", "MODEL", "ENGINE", "READY", "DESIRED", "GPU", "STATE", "AGE",
    ] {
        assert!(header.contains(col), "md column {col} missing: {out}");
    }
    for value in ["qwen2.5-0.5b-instruct", "copyhold", "Tesla-P40", "Ready"] {
        assert!(out.contains(value), "md value {value} missing: {out}");
    }
    let out = kubectl_ok(&["get", "sq", "-n", &ns.name])?;
    for col in ["MEMBERS", "PERIOD", "RESETS", "STATE"] {
        assert!(out.contains(col), "sq column {col} missing: {out}");
    }
    assert!(out.contains("calendar month (Europe/Berlin)"), "{out}");

    // EnergyBudget is cluster-scoped: a name of this test's own.
    let eb_name = format!("columns-{}", ns.name);
    let eb: Api<EnergyBudget> = Api::all(client.clone());
    let obj = serde_json::json!({
        "apiVersion": "copyhold.dev/v1alpha1", "kind": "EnergyBudget",
        "metadata": {"name": eb_name},
        // It covers no node, so a controller running beside this test
        // (the EnergyBudget reconciler is cluster-wide) writes the same
        // supply, allowance and state as the status below; only the draw
        // may differ (0 for no node).
        "spec": {"ceilingWatts": 3000, "supply": {"static": {"watts": 2000}},
                 "nodeSelector": {"copyhold.dev/no-such-label": eb_name}}
    });
    eb.patch(
        &eb_name,
        &PatchParams::apply("copyhold-e2e"),
        &Patch::Apply(&obj),
    )
    .await?;
    let status = serde_json::json!({
        "apiVersion": "copyhold.dev/v1alpha1", "kind": "EnergyBudget",
        "status": {"supplyWatts": 2000.0, "allowanceWatts": 1600.0, "drawWatts": 1234.5, "state": "WithinBudget"}
    });
    eb.patch_status(
        &eb_name,
        &PatchParams::apply("copyhold-e2e").force(),
        &Patch::Apply(&status),
    )
    .await?;
    let out = kubectl_ok(&["get", "eb", &eb_name])?;
    eb.delete(&eb_name, &Default::default()).await?;
    for v in [
        "SUPPLY W",
        "ALLOWANCE W",
        "DRAW W",
        "STATE",
        "2000",
        "1600",
        "WithinBudget",
    ] {
        assert!(out.contains(v), "eb: {v} missing: {out}");
    }
    assert!(
        out.contains("1234.5") || out.contains(" 0 "),
        "eb: the draw column shows neither the test's nor a controller's value: {out}"
    );
    // Defaults were applied by the server from the schema.
    let stored = eb_defaults_probe(&client).await?;
    assert_eq!(stored, 20.0, "marginPercent defaults to 20");
    Ok(())
}

async fn eb_defaults_probe(client: &kube::Client) -> Result<f64> {
    let name = format!("defaults-{}", std::process::id());
    let eb: Api<EnergyBudget> = Api::all(client.clone());
    let obj = serde_json::json!({
        "apiVersion": "copyhold.dev/v1alpha1", "kind": "EnergyBudget",
        "metadata": {"name": name},
        "spec": {"ceilingWatts": 100, "supply": {"static": {"watts": 50}}}
    });
    let created = eb
        .patch(
            &name,
            &PatchParams::apply("copyhold-e2e"),
            &Patch::Apply(&obj),
        )
        .await?;
    eb.delete(&name, &Default::default()).await?;
    Ok(created.spec.margin_percent)
}

#[tokio::test]
async fn kubectl_explain_shows_the_doc_comments() -> Result<()> {
    install_crds().await?;
    let out = eventually(Duration::from_secs(30), || async {
        kubectl_ok(&["explain", "modeldeployment.spec"])
    })
    .await?;
    assert!(out.contains("Which engine serves the model."), "{out}");
    assert!(out.contains("replicas"), "{out}");
    let out = kubectl_ok(&["explain", "stintquota.spec.sanctions"])?;
    assert!(out.contains("Graduated sanctions"), "{out}");
    let out = kubectl_ok(&["explain", "eb.spec.marginPercent"])?;
    assert!(
        out.contains("Percent of the supply kept unused as slack"),
        "{out}"
    );
    Ok(())
}

#[tokio::test]
async fn kubectl_scale_sets_replicas_through_the_scale_subresource() -> Result<()> {
    install_crds().await?;
    let client = copyhold_e2e::client().await?;
    let ns = TestNamespace::create("scale")?;
    kubectl_ok(&[
        "apply",
        "-n",
        &ns.name,
        "-f",
        "examples/model-deployment.yaml",
    ])?;
    kubectl_ok(&[
        "scale",
        "-n",
        &ns.name,
        "md/qwen2-5-0-5b-instruct",
        "--replicas=3",
    ])?;
    let md: Api<ModelDeployment> = Api::namespaced(client, &ns.name);
    let got = md.get("qwen2-5-0-5b-instruct").await?;
    assert_eq!(got.spec.replicas, 3);
    assert_eq!(
        ModelDeployment::crd().spec.versions[0]
            .subresources
            .as_ref()
            .and_then(|s| s.scale.as_ref())
            .map(|s| s.spec_replicas_path.as_str()),
        Some(".spec.replicas")
    );
    // The generation moved, so a controller will see the change.
    assert!(got.meta().generation.unwrap_or(0) >= 2);
    Ok(())
}

/// The rows of a shared table under `tests/formats/`: each value and
/// whether the API server reads it (the `api` column).
fn format_rows(file: &str) -> Result<Vec<(String, bool)>> {
    let path = workspace_root().join("tests/formats").join(file);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading the shared table {}", path.display()))?;
    let mut rows = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let [value, api, _] = f[..] else {
            bail!("{}: not three columns: {line}", path.display());
        };
        rows.push((value.to_string(), api == "ok"));
    }
    Ok(rows)
}

/// Whether the API server reads `value` as a quantity: sent (dry run) as a
/// ResourceQuota's hard limit. A value it cannot read is refused as a bad
/// request (400) before validation; a negative one is read and then found
/// invalid (422), so it counts as read.
async fn server_reads_quantity(api: &Api<ResourceQuota>, value: &str) -> Result<bool> {
    let quota: ResourceQuota = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "quantity-probe"},
        "spec": {"hard": {"requests.storage": value}},
    }))?;
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    match api.create(&dry_run, &quota).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 400 => Ok(false),
        Err(kube::Error::Api(s)) if s.code == 422 => Ok(true),
        Err(e) => Err(e.into()),
    }
}

#[tokio::test]
async fn the_api_server_the_table_and_the_quantity_parser_agree() -> Result<()> {
    let client = copyhold_e2e::client().await?;
    let ns = TestNamespace::create("quantities")?;
    let api: Api<ResourceQuota> = Api::namespaced(client, &ns.name);
    let rows = format_rows("quantities.txt")?;
    assert!(rows.len() >= 40, "the table has its rows");
    let mut wrong = Vec::new();
    for (value, table) in &rows {
        let server = server_reads_quantity(&api, value).await?;
        let parser = copyhold::resources::quantity::Quantity::parse(value).is_ok();
        if server != *table || parser != *table {
            wrong.push(format!(
                "{value}: table {table}, API server {server}, parser {parser}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    Ok(())
}

#[tokio::test]
async fn the_api_server_the_table_and_the_duration_parser_agree() -> Result<()> {
    install_crds().await?;
    let client = copyhold_e2e::client().await?;
    let api: Api<EnergyBudget> = Api::all(client);
    let rows = format_rows("durations.txt")?;
    assert!(rows.len() >= 20, "the table has its rows");
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let mut wrong = Vec::new();
    for (value, table) in &rows {
        let eb: EnergyBudget = serde_json::from_value(serde_json::json!({
            "apiVersion": "copyhold.dev/v1alpha1",
            "kind": "EnergyBudget",
            "metadata": {"name": "duration-probe"},
            "spec": {
                "ceilingWatts": 3000,
                "supply": {"static": {"watts": 1000}},
                "evaluationInterval": value,
            },
        }))?;
        let server = match api.create(&dry_run, &eb).await {
            Ok(_) => true,
            Err(kube::Error::Api(s))
                if s.code == 422 && s.message.contains("spec.evaluationInterval") =>
            {
                false
            }
            Err(e) => return Err(e.into()),
        };
        let parser = copyhold::resources::parse_duration(value).is_ok();
        if server != *table || parser != *table {
            wrong.push(format!(
                "{value}: table {table}, API server {server}, parser {parser}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    Ok(())
}
