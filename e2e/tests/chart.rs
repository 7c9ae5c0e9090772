//! The Helm chart: lints clean, renders for several value sets with the
//! restricted security contexts and least-privilege RBAC, refuses bad values
//! with the schema's message, carries the current CRDs and dashboards, and
//! installs, upgrades and uninstalls on the test cluster keeping the users'
//! objects.

use std::process::{Command, Output};

use anyhow::{Context, Result, bail};
use copyhold_e2e::{
    TestNamespace, cluster_helm, cluster_helm_ok, helm, install_crds, kubectl, kubectl_ok,
    workspace_root,
};
use serde_json::Value;

fn run_helm(args: &[&str]) -> Result<Output> {
    Ok(Command::new(helm()?)
        .args(args)
        .current_dir(workspace_root())
        .output()?)
}

/// `helm template` with `set`, as parsed objects.
fn render(set: &[&str]) -> Result<Vec<Value>> {
    let mut args = vec![
        "template",
        "copyhold",
        "charts/copyhold",
        "-n",
        "copyhold-system",
    ];
    args.extend_from_slice(set);
    let out = run_helm(&args)?;
    anyhow::ensure!(
        out.status.success(),
        "{set:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    // One value per document; documents holding only comments are skipped.
    serde_saphyr::from_multiple(&text)
        .with_context(|| format!("{set:?}: rendered YAML does not parse:\n{text}"))
}

fn of_kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn named<'a>(objects: &'a [Value], kind: &str, suffix: &str) -> Option<&'a Value> {
    objects.iter().find(|o| {
        o["kind"] == kind
            && o["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.ends_with(suffix))
    })
}

/// The restricted Pod Security profile, on the Pod and on every container.
fn assert_restricted(deployment: &Value) {
    let name = deployment["metadata"]["name"].as_str().unwrap_or("?");
    let pod = &deployment["spec"]["template"]["spec"];
    let psc = &pod["securityContext"];
    assert_eq!(psc["runAsNonRoot"], true, "{name}");
    assert!(
        psc["runAsUser"].as_i64().is_some_and(|u| u > 0),
        "{name}: numeric non-root runAsUser"
    );
    assert_eq!(psc["seccompProfile"]["type"], "RuntimeDefault", "{name}");
    let containers = pod["containers"].as_array().expect("containers");
    assert!(!containers.is_empty());
    for c in containers {
        let sc = &c["securityContext"];
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
        assert_eq!(sc["runAsNonRoot"], true, "{name}");
        assert_eq!(
            sc["capabilities"]["drop"],
            serde_json::json!(["ALL"]),
            "{name}"
        );
        assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{name}");
    }
}

/// No `*` in the verbs, resources or API groups of any Role or ClusterRole.
fn assert_no_wildcards(objects: &[Value]) {
    let roles: Vec<_> = objects
        .iter()
        .filter(|o| o["kind"] == "Role" || o["kind"] == "ClusterRole")
        .collect();
    assert!(!roles.is_empty());
    for role in roles {
        for rule in role["rules"].as_array().expect("rules") {
            for field in ["verbs", "resources", "apiGroups"] {
                for v in rule[field].as_array().into_iter().flatten() {
                    assert_ne!(
                        v, "*",
                        "{} {}: `*` in {field}",
                        role["kind"], role["metadata"]["name"]
                    );
                }
            }
        }
    }
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
    let sets: [&[&str]; 5] = [
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
        &[
            "--set",
            "gateway.replicas=3",
            "--set",
            "serviceMonitor.enabled=true",
            "--set",
            "dashboards.enabled=true",
            "--set",
            "gateway.service.type=LoadBalancer",
        ],
        &[
            "--set",
            "networkPolicy.enabled=false",
            "--set",
            "gateway.watchNamespace=town",
        ],
    ];
    for set in sets {
        let objects = render(set)?;
        let has = |flag: &str| set.contains(&flag);
        let controller = named(&objects, "Deployment", "-controller").context("controller")?;
        let gateway = named(&objects, "Deployment", "-gateway").context("gateway")?;
        assert_restricted(controller);
        assert_restricted(gateway);
        assert_no_wildcards(&objects);
        for o in &objects {
            let labels = &o["metadata"]["labels"];
            for l in [
                "app.kubernetes.io/name",
                "app.kubernetes.io/instance",
                "app.kubernetes.io/version",
                "app.kubernetes.io/component",
                "app.kubernetes.io/part-of",
                "app.kubernetes.io/managed-by",
                "helm.sh/chart",
            ] {
                assert!(
                    labels[l].is_string(),
                    "{set:?}: {} {} lacks label {l}",
                    o["kind"],
                    o["metadata"]["name"]
                );
            }
        }

        // The gateway: replicas, identity from the downward API, probes,
        // time to drain.
        let replicas = if has("gateway.replicas=3") { 3 } else { 2 };
        assert_eq!(gateway["spec"]["replicas"], replicas, "{set:?}");
        let pod = &gateway["spec"]["template"]["spec"];
        let c = &pod["containers"][0];
        assert_eq!(c["args"][0], "gateway");
        assert!(
            c["args"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a == "--listen=0.0.0.0:8080"),
            "{c}"
        );
        let pod_name = c["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "POD_NAME")
            .context("POD_NAME")?;
        assert_eq!(
            pod_name["valueFrom"]["fieldRef"]["fieldPath"],
            "metadata.name"
        );
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert!(pod["terminationGracePeriodSeconds"].as_i64().unwrap_or(0) >= 60);
        assert_eq!(
            pod["serviceAccountName"],
            named(&objects, "ServiceAccount", "-gateway").context("gateway SA")?["metadata"]["name"]
        );
        let svc = named(&objects, "Service", "-gateway").context("gateway Service")?;
        let svc_type = if has("gateway.service.type=LoadBalancer") {
            "LoadBalancer"
        } else {
            "ClusterIP"
        };
        assert_eq!(svc["spec"]["type"], svc_type);
        assert_eq!(svc["spec"]["ports"][0]["port"], 8080);

        // The gateway's RBAC: reads what it watches, writes only the
        // register in stintquotas/status and its own demand Leases.
        let gateway_rules: Vec<&Value> = objects
            .iter()
            .filter(|o| {
                (o["kind"] == "Role" || o["kind"] == "ClusterRole")
                    && o["metadata"]["name"]
                        .as_str()
                        .is_some_and(|n| n.ends_with("-gateway") || n.ends_with("-gateway-keys"))
            })
            .flat_map(|r| r["rules"].as_array().unwrap().iter())
            .collect();
        let verbs_on = |resource: &str| -> Vec<String> {
            let mut v: Vec<String> = gateway_rules
                .iter()
                .filter(|r| {
                    r["resources"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|x| x == resource)
                })
                .flat_map(|r| r["verbs"].as_array().unwrap().iter())
                .map(|v| v.as_str().unwrap().to_owned())
                .collect();
            v.sort();
            v
        };
        for r in [
            "stintquotas",
            "modeldeployments",
            "pods",
            "replicasets",
            "deployments",
            "secrets",
            "energybudgets",
        ] {
            assert_eq!(verbs_on(r), ["get", "list", "watch"], "{set:?}: {r}");
        }
        assert_eq!(verbs_on("stintquotas/status"), ["get", "update"]);
        // Its demand Leases, which the autoscaler reads, and its slice
        // Leases (the register's per-replica part).
        assert_eq!(
            verbs_on("leases"),
            ["create", "delete", "get", "list", "patch", "update"],
            "{set:?}"
        );
        if has("gateway.watchNamespace=town") {
            let role = named(&objects, "Role", "-gateway").context("gateway Role")?;
            assert_eq!(role["metadata"]["namespace"], "town");
            let cluster = named(&objects, "ClusterRole", "-gateway").context("ClusterRole")?;
            assert_eq!(
                cluster["rules"].as_array().unwrap().len(),
                1,
                "only EnergyBudgets cluster-wide: {cluster}"
            );
            assert!(
                c["args"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|a| a == "--watch-namespace=town")
            );
        }

        if has("controller.watchNamespace=town") {
            let args = &controller["spec"]["template"]["spec"]["containers"][0]["args"];
            assert!(
                args.as_array()
                    .unwrap()
                    .iter()
                    .any(|a| a == "--watch-namespace=town"),
                "{args}"
            );
        }
        let monitors = of_kind(&objects, "ServiceMonitor");
        if has("serviceMonitor.enabled=true") {
            assert_eq!(monitors.len(), 2, "controller and gateway");
        } else {
            assert!(monitors.is_empty());
        }

        let policies = of_kind(&objects, "NetworkPolicy");
        if has("networkPolicy.enabled=false") {
            assert!(policies.is_empty());
        } else {
            assert_eq!(policies.len(), 3, "{set:?}");
            let inference =
                named(&objects, "NetworkPolicy", "-inference").context("inference policy")?;
            assert_eq!(
                inference["spec"]["podSelector"]["matchLabels"],
                serde_json::json!({
                    "app.kubernetes.io/component": "inference",
                    "app.kubernetes.io/part-of": "copyhold"
                })
            );
            let from: Vec<&Value> = inference["spec"]["ingress"][0]["from"]
                .as_array()
                .unwrap()
                .iter()
                .collect();
            let components: Vec<&Value> = from
                .iter()
                .map(|p| &p["podSelector"]["matchLabels"]["app.kubernetes.io/component"])
                .collect();
            assert_eq!(components, ["gateway", "controller"]);
            let gw = named(&objects, "NetworkPolicy", "-gateway").context("gateway policy")?;
            assert_eq!(gw["spec"]["ingress"][0]["ports"][0]["port"], 8080);
        }

        let dashboards = of_kind(&objects, "ConfigMap");
        if has("dashboards.enabled=true") {
            let cm = dashboards.first().context("dashboards ConfigMap")?;
            assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
            let data = cm["data"].as_object().unwrap();
            for d in ["energy", "commons", "serving", "fleet"] {
                let json = data[&format!("copyhold-{d}.json")].as_str().unwrap();
                let parsed: Value = serde_json::from_str(json)?;
                assert!(parsed["panels"].as_array().is_some_and(|p| !p.is_empty()));
            }
        } else {
            assert!(dashboards.is_empty());
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
    for (set, flag, message) in [
        (
            "gateway.replicas=-1",
            "--set",
            "at '/gateway/replicas': minimum: got -1, want 0",
        ),
        (
            "gateway.replicas=two",
            "--set-string",
            "at '/gateway/replicas': got string, want integer",
        ),
        (
            "gateway.service.type=Ingress",
            "--set",
            "at '/gateway/service/type': value must be one of",
        ),
        ("podSecurity.runAsUser=0", "--set", "/podSecurity/runAsUser"),
    ] {
        let out = run_helm(&["template", "copyhold", "charts/copyhold", flag, set])?;
        assert!(!out.status.success(), "{set} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("don't meet the specifications of the schema") && err.contains(message),
            "{set}: {err}"
        );
    }
    Ok(())
}

#[test]
fn images_by_digest_runtime_classes_and_pull_secrets_reach_the_pods_and_the_controller()
-> Result<()> {
    let digest = format!("sha256:{}", "ab".repeat(32));
    let objects = render(&[
        "--set",
        &format!("image.digest={digest}"),
        "--set",
        "runtimeClassName=gvisor",
        "--set",
        "imagePullSecrets[0].name=mirror",
        "--set",
        "controller.engineRuntimeClassName=nvidia",
        "--set",
        "controller.engineImagePullSecrets={mirror,second}",
        "--set",
        &format!("controller.engineImages.copyhold=registry.local/copyhold-node@{digest}"),
    ])?;
    for suffix in ["-controller", "-gateway"] {
        let d = named(&objects, "Deployment", suffix).context(suffix)?;
        let pod = &d["spec"]["template"]["spec"];
        assert_eq!(
            pod["containers"][0]["image"],
            format!("ghcr.io/copyhold/copyhold@{digest}"),
            "{suffix}"
        );
        assert_eq!(pod["runtimeClassName"], "gvisor", "{suffix}");
        assert_eq!(
            pod["imagePullSecrets"],
            serde_json::json!([{"name": "mirror"}])
        );
    }
    let controller = named(&objects, "Deployment", "-controller").context("controller")?;
    let args: Vec<&str> = controller["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .context("args")?
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    for want in [
        "--node-runtime-class=nvidia",
        "--node-image-pull-secret=mirror",
        "--node-image-pull-secret=second",
        &format!("--node-image=registry.local/copyhold-node@{digest}"),
    ] {
        assert!(args.contains(&want), "{want} not in {args:?}");
    }
    // A tag and a digest: both written, the digest decides.
    let objects = render(&[
        "--set",
        "image.tag=0.1.0",
        "--set",
        &format!("image.digest={digest}"),
    ])?;
    let d = named(&objects, "Deployment", "-gateway").context("gateway")?;
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["image"],
        format!("ghcr.io/copyhold/copyhold:0.1.0@{digest}")
    );
    // Unset: the tag, no runtime class, no extra arguments.
    let objects = render(&[])?;
    let d = named(&objects, "Deployment", "-controller").context("controller")?;
    let pod = &d["spec"]["template"]["spec"];
    assert_eq!(
        pod["containers"][0]["image"],
        "ghcr.io/copyhold/copyhold:0.1.0"
    );
    assert!(pod.get("runtimeClassName").is_none());
    let text = pod["containers"][0]["args"].to_string();
    assert!(
        !text.contains("--node-runtime-class") && !text.contains("--node-image-pull-secret"),
        "{text}"
    );
    // A digest that is not one is refused by the schema.
    let out = run_helm(&[
        "template",
        "copyhold",
        "charts/copyhold",
        "--set",
        "image.digest=latest",
    ])?;
    assert!(!out.status.success(), "a bad digest was accepted");
    assert!(String::from_utf8_lossy(&out.stderr).contains("/image/digest"));
    Ok(())
}

#[test]
fn the_node_admin_token_secret_is_passed_to_the_controller() -> Result<()> {
    let args_of = |objects: &[Value]| -> Result<Vec<String>> {
        let controller = named(objects, "Deployment", "-controller").context("controller")?;
        Ok(
            controller["spec"]["template"]["spec"]["containers"][0]["args"]
                .as_array()
                .context("args")?
                .iter()
                .filter_map(|a| a.as_str().map(str::to_owned))
                .collect(),
        )
    };
    let args = args_of(&render(&[])?)?;
    assert!(
        !args
            .iter()
            .any(|a| a.starts_with("--node-admin-token-secret")),
        "off by default: {args:?}"
    );
    let args = args_of(&render(&[
        "--set",
        "controller.nodeAdminTokenSecret=copyhold-node-admin",
    ])?)?;
    assert!(
        args.contains(&"--node-admin-token-secret=copyhold-node-admin".to_string()),
        "{args:?}"
    );
    let out = run_helm(&[
        "template",
        "copyhold",
        "charts/copyhold",
        "--set",
        "controller.nodeAdminTokenSecret=Not_A_Name",
    ])?;
    assert!(!out.status.success(), "a bad Secret name was accepted");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/controller/nodeAdminTokenSecret"), "{err}");
    Ok(())
}

#[test]
fn the_chart_carries_the_current_dashboards() -> Result<()> {
    let root = workspace_root();
    let mut names = Vec::new();
    for entry in std::fs::read_dir(root.join("dashboards"))? {
        let path = entry?.path();
        let name = path.file_name().context("file name")?.to_owned();
        names.push(name.clone());
        let chart_copy = root.join("charts/copyhold/dashboards").join(&name);
        assert!(
            std::fs::read_to_string(&path)?
                == std::fs::read_to_string(&chart_copy).unwrap_or_default(),
            "charts/copyhold/dashboards/{} differs from dashboards/: cp dashboards/*.json charts/copyhold/dashboards/",
            name.to_string_lossy()
        );
    }
    for entry in std::fs::read_dir(root.join("charts/copyhold/dashboards"))? {
        let name = entry?.file_name();
        assert!(
            names.contains(&name),
            "charts/copyhold/dashboards/{} is not in dashboards/",
            name.to_string_lossy()
        );
    }
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

/// Uninstalls the release when dropped (also when a test fails midway).
struct Release {
    name: String,
    namespace: String,
    installed: bool,
}

impl Drop for Release {
    fn drop(&mut self) {
        if self.installed {
            let _ = cluster_helm(&["uninstall", &self.name, "-n", &self.namespace]);
        }
    }
}

/// What `sa` may do, as the API server's authorizer says.
fn can_i(sa: &str, verb: &str, resource: &str, ns: Option<&str>) -> Result<bool> {
    let (resource, sub) = match resource.split_once('/') {
        Some((r, sub)) => (r, Some(format!("--subresource={sub}"))),
        None => (resource, None),
    };
    let mut args = vec!["auth", "can-i", verb, resource, "--as", sa];
    if let Some(sub) = &sub {
        args.push(sub);
    }
    match ns {
        Some(ns) => args.extend(["-n", ns]),
        None => args.push("--all-namespaces"),
    }
    let out = kubectl(&args)?;
    Ok(String::from_utf8_lossy(&out.stdout).trim() == "yes")
}

/// Rules of the gateway's Roles or ClusterRoles (by kind) on `resource`.
fn gateway_rules_on<'a>(objects: &'a [Value], kind: &str, resource: &str) -> Vec<&'a Value> {
    objects
        .iter()
        .filter(|o| o["kind"] == kind)
        .filter(|o| {
            o["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.ends_with("-gateway") || n.ends_with("-gateway-keys"))
        })
        .filter(|o| {
            o["rules"].as_array().is_some_and(|rs| {
                rs.iter().any(|r| {
                    r["resources"]
                        .as_array()
                        .is_some_and(|x| x.iter().any(|x| x == resource))
                })
            })
        })
        .collect()
}

#[test]
fn the_gateway_reads_secrets_only_through_roles_in_the_namespaces_it_serves() -> Result<()> {
    // Default values: a Role in the release namespace, no ClusterRole rule.
    let objects = render(&[])?;
    assert!(
        gateway_rules_on(&objects, "ClusterRole", "secrets").is_empty(),
        "a ClusterRole reads Secrets by default"
    );
    let roles = gateway_rules_on(&objects, "Role", "secrets");
    let namespaces: Vec<&Value> = roles.iter().map(|r| &r["metadata"]["namespace"]).collect();
    assert_eq!(namespaces, ["copyhold-system"], "{roles:?}");
    // The namespaces the gateway serves: a Role (and RoleBinding) in each,
    // and the gateway told to read keys only there.
    let objects = render(&["--set", "gateway.keyNamespaces={town,city}"])?;
    assert!(gateway_rules_on(&objects, "ClusterRole", "secrets").is_empty());
    let mut namespaces: Vec<&str> = gateway_rules_on(&objects, "Role", "secrets")
        .iter()
        .filter_map(|r| r["metadata"]["namespace"].as_str())
        .collect();
    namespaces.sort();
    assert_eq!(namespaces, ["city", "town"]);
    let mut bound: Vec<&str> = of_kind(&objects, "RoleBinding")
        .into_iter()
        .filter(|b| {
            b["roleRef"]["name"]
                .as_str()
                .is_some_and(|n| n.ends_with("-gateway-keys"))
        })
        .filter_map(|b| b["metadata"]["namespace"].as_str())
        .collect();
    bound.sort();
    assert_eq!(bound, ["city", "town"]);
    let gateway = named(&objects, "Deployment", "-gateway").context("gateway")?;
    let args = &gateway["spec"]["template"]["spec"]["containers"][0]["args"];
    assert!(
        args.as_array()
            .is_some_and(|a| a.iter().any(|a| a == "--key-namespaces=town,city")),
        "{args}"
    );
    Ok(())
}

#[test]
fn the_gateway_serves_metrics_on_a_port_of_its_own_behind_a_service_of_its_own() -> Result<()> {
    let objects = render(&["--set", "serviceMonitor.enabled=true"])?;
    let gateway = named(&objects, "Deployment", "-gateway").context("gateway")?;
    let c = &gateway["spec"]["template"]["spec"]["containers"][0];
    assert!(
        c["args"]
            .as_array()
            .is_some_and(|a| a.iter().any(|a| a == "--metrics-addr=0.0.0.0:9090")),
        "{c}"
    );
    let ports: Vec<(&str, i64)> = c["ports"]
        .as_array()
        .context("ports")?
        .iter()
        .filter_map(|p| Some((p["name"].as_str()?, p["containerPort"].as_i64()?)))
        .collect();
    assert_eq!(ports, [("http", 8080), ("metrics", 9090)]);
    // The public Service carries the API only.
    let public = named(&objects, "Service", "-gateway").context("gateway Service")?;
    let names: Vec<&Value> = public["spec"]["ports"]
        .as_array()
        .context("ports")?
        .iter()
        .map(|p| &p["targetPort"])
        .collect();
    assert_eq!(names, ["http"]);
    let metrics = named(&objects, "Service", "-gateway-metrics").context("metrics Service")?;
    assert_eq!(metrics["spec"]["type"], Value::Null, "ClusterIP by default");
    assert_eq!(metrics["spec"]["ports"][0]["targetPort"], "metrics");
    let monitor = named(&objects, "ServiceMonitor", "-gateway").context("ServiceMonitor")?;
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
    Ok(())
}

#[tokio::test]
async fn the_chart_installs_upgrades_and_uninstalls_keeping_the_registers() -> Result<()> {
    install_crds().await?;
    let ns = TestNamespace::create("chart")?;
    let ns = ns.name.as_str();
    // Helm names must be short; the namespace is unique already.
    let release = format!("ch{}", &ns[ns.len().saturating_sub(8)..]);
    let mut guard = Release {
        name: release.clone(),
        namespace: ns.to_owned(),
        installed: false,
    };

    // A member's register, written to the status as the gateway would.
    let quota = serde_json::json!({
        "apiVersion": "copyhold.dev/v1alpha1",
        "kind": "StintQuota",
        "metadata": {"name": "register", "namespace": ns},
        "spec": {
            "members": [{"name": "bakery", "apiKeySecret": {"name": "member-bakery"}}],
            "period": {"type": "calendar", "unit": "month"}
        }
    });
    let file = std::env::temp_dir().join(format!("{ns}-quota.json"));
    std::fs::write(&file, quota.to_string())?;
    kubectl_ok(&["create", "-f", file.to_str().unwrap()])?;
    let status = r#"{"status":{"memberCount":1,"members":[{"name":"bakery","promptTokens":100,"completionTokens":23,"tokens":123,"energyWh":0.5,"requests":3}]}}"#;
    kubectl_ok(&[
        "patch",
        "stintquota",
        "register",
        "-n",
        ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        status,
    ])?;
    let tokens = || -> Result<String> {
        kubectl_ok(&[
            "get",
            "stintquota",
            "register",
            "-n",
            ns,
            "-o",
            "jsonpath={.status.members[0].tokens}",
        ])
    };
    assert_eq!(tokens()?, "123");

    // Bad values fail at install with the schema's message, leaving nothing.
    let out = cluster_helm(&[
        "install",
        &format!("{release}-bad"),
        "charts/copyhold",
        "-n",
        ns,
        "--set",
        "gateway.replicas=-1",
    ])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("at '/gateway/replicas': minimum: got -1, want 0"),
        "{err}"
    );

    // Without a kubelet `--wait` cannot succeed: check the objects instead.
    // Client-side apply: the CRDs, already there, are left as they are
    // (other tests on this cluster own their fields).
    guard.installed = true;
    cluster_helm_ok(&[
        "install",
        &release,
        "charts/copyhold",
        "-n",
        ns,
        "--server-side=false",
        "--set",
        "controller.replicas=1",
        "--set",
        "dashboards.enabled=true",
    ])?;
    let dashboards = kubectl_ok(&[
        "get",
        "configmaps",
        "-n",
        ns,
        "-l",
        "grafana_dashboard=1",
        "-o",
        "jsonpath={.items[*].metadata.name}",
    ])?;
    assert_eq!(dashboards, format!("{release}-copyhold-dashboards"));
    let full = format!("{release}-copyhold");
    let names = kubectl_ok(&[
        "get",
        "deployments,services,serviceaccounts,networkpolicies,roles,rolebindings",
        "-n",
        ns,
        "-o",
        "name",
    ])?;
    for want in [
        format!("deployment.apps/{full}-controller"),
        format!("deployment.apps/{full}-gateway"),
        format!("service/{full}-gateway"),
        format!("service/{full}-controller-metrics"),
        format!("service/{full}-gateway-metrics"),
        format!("role.rbac.authorization.k8s.io/{full}-gateway-keys"),
        format!("serviceaccount/{full}-gateway"),
        format!("serviceaccount/{full}-controller"),
        format!("networkpolicy.networking.k8s.io/{full}-gateway"),
        format!("networkpolicy.networking.k8s.io/{full}-inference"),
        format!("role.rbac.authorization.k8s.io/{full}-leader-election"),
    ] {
        assert!(names.lines().any(|l| l == want), "{want} missing:\n{names}");
    }
    for role in ["controller", "gateway"] {
        kubectl_ok(&["get", "clusterrole", &format!("{full}-{role}")])?;
    }
    // The API server accepted the Deployments: the deployment controller
    // observed them and made their ReplicaSets and Pods, with the security
    // contexts the chart asked for.
    copyhold_e2e::eventually(std::time::Duration::from_secs(60), || async {
        for d in ["controller", "gateway"] {
            let observed = kubectl_ok(&[
                "get",
                "deployment",
                &format!("{full}-{d}"),
                "-n",
                ns,
                "-o",
                "jsonpath={.status.observedGeneration}/{.status.replicas}",
            ])?;
            let want = if d == "gateway" { "1/2" } else { "1/1" };
            if observed != want {
                bail!("{d}: observedGeneration/replicas {observed}, want {want}");
            }
        }
        Ok(())
    })
    .await?;
    let pods: Value = serde_json::from_str(&kubectl_ok(&[
        "get",
        "pods",
        "-n",
        ns,
        "-l",
        &format!("app.kubernetes.io/instance={release}"),
        "-o",
        "json",
    ])?)?;
    let pods = pods["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(pods.len(), 3, "1 controller + 2 gateways");
    for p in &pods {
        assert_eq!(p["spec"]["securityContext"]["runAsNonRoot"], true);
        assert_eq!(
            p["spec"]["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        assert_eq!(
            p["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"],
            true
        );
    }

    // The policy a model namespace applies is accepted as it is shipped.
    kubectl_ok(&[
        "apply",
        "--dry-run=server",
        "-n",
        ns,
        "-f",
        "examples/network-policy/model-namespace.yaml",
    ])?;

    // Least privilege, as the authorizer sees it.
    let gw = format!("system:serviceaccount:{ns}:{full}-gateway");
    for (verb, resource) in [
        ("watch", "pods"),
        ("watch", "replicasets.apps"),
        ("list", "deployments.apps"),
        ("list", "stintquotas.copyhold.dev"),
        ("watch", "modeldeployments.copyhold.dev"),
        ("update", "stintquotas.copyhold.dev/status"),
    ] {
        assert!(
            can_i(&gw, verb, resource, None)?,
            "gateway cannot {verb} {resource}"
        );
    }
    assert!(can_i(&gw, "list", "energybudgets.copyhold.dev", None)?);
    // Members' keys: only in the namespace it serves (here the release's).
    assert!(can_i(&gw, "watch", "secrets", Some(ns))?);
    assert!(
        !can_i(&gw, "list", "secrets", None)?,
        "the gateway may read Secrets cluster-wide"
    );
    for (verb, resource) in [
        ("create", "secrets"),
        ("delete", "pods"),
        ("update", "stintquotas.copyhold.dev"),
        ("patch", "modeldeployments.copyhold.dev"),
        ("create", "deployments.apps"),
        ("update", "energybudgets.copyhold.dev"),
    ] {
        assert!(
            !can_i(&gw, verb, resource, Some(ns))?,
            "gateway may {verb} {resource}"
        );
    }

    // The controller puts its finalizer on EnergyBudgets (metadata: the
    // main resource, not only /status) and removes it.
    let ctl = format!("system:serviceaccount:{ns}:{full}-controller");
    for verb in ["patch", "update"] {
        assert!(
            can_i(&ctl, verb, "energybudgets.copyhold.dev", None)?,
            "the controller cannot {verb} energybudgets"
        );
    }

    // An upgrade keeps the register.
    cluster_helm_ok(&[
        "upgrade",
        &release,
        "charts/copyhold",
        "-n",
        ns,
        "--set",
        "controller.replicas=1",
        "--set",
        "gateway.replicas=3",
        "--set",
        "networkPolicy.enabled=false",
    ])?;
    let replicas = kubectl_ok(&[
        "get",
        "deployment",
        &format!("{full}-gateway"),
        "-n",
        ns,
        "-o",
        "jsonpath={.spec.replicas}",
    ])?;
    assert_eq!(replicas, "3");
    let policies = kubectl_ok(&["get", "networkpolicies", "-n", ns, "-o", "name"])?;
    assert!(policies.trim().is_empty(), "{policies}");
    assert_eq!(tokens()?, "123", "the upgrade lost the register");

    // Uninstall removes the release's objects and leaves the CRDs and the
    // users' objects.
    cluster_helm_ok(&["uninstall", &release, "-n", ns])?;
    guard.installed = false;
    for crd in [
        "stintquotas.copyhold.dev",
        "modeldeployments.copyhold.dev",
        "energybudgets.copyhold.dev",
    ] {
        kubectl_ok(&["get", "crd", crd])?;
    }
    assert_eq!(tokens()?, "123", "the uninstall lost the register");
    let left = kubectl(&["get", "clusterrole", &format!("{full}-gateway")])?;
    assert!(!left.status.success(), "the gateway's ClusterRole is left");
    let left = kubectl_ok(&["get", "deployments", "-n", ns, "-o", "name"])?;
    assert!(left.trim().is_empty(), "{left}");
    Ok(())
}
