//! The register page (`/register`) served by real `copyhold gateway`
//! processes against the real API server, metered through the stand-in
//! upstream, and read by headless Chromium (Debian's `chromium`): the DOM
//! the browser built is checked, not the text the gateway sent.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use copyhold::resources::EnergyBudget;
use copyhold::resources::stint_quota::{StintQuota, StintQuotaStatus};
use copyhold_e2e::processes::{Listening, spawn_listening};
use copyhold_e2e::{
    TestNamespace, client, create_secret, eventually, install_crds, kubectl_ok, workspace_bin,
    workspace_root,
};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

/// A gateway on loopback, watching `namespace` (or everything), with extra
/// arguments.
fn gateway(namespace: Option<&str>, extra: &[&str]) -> Result<Listening> {
    let mut c = Command::new(workspace_bin("copyhold", "copyhold")?);
    c.args([
        "gateway",
        "--listen",
        "127.0.0.1:0",
        "--metrics-addr",
        "127.0.0.1:0",
    ]);
    if let Some(ns) = namespace {
        c.args(["--watch-namespace", ns]);
    }
    c.args(extra)
        .env("KUBECONFIG", copyhold_e2e::kubeconfig()?)
        .env("RUST_LOG", "warn,copyhold=info");
    spawn_listening(c)
}

/// A namespace with a StintQuota whose members each have a key.
struct Tenant {
    ns: TestNamespace,
    quota: String,
    keys: BTreeMap<String, String>,
}

async fn tenant(prefix: &str, quota: &str, mut spec: Value) -> Result<Tenant> {
    install_crds().await?;
    let ns = TestNamespace::create(prefix)?;
    let mut keys = BTreeMap::new();
    for m in spec["members"].as_array_mut().context("members")? {
        let name = m["name"].as_str().context("name")?.to_string();
        let key = format!("sk-{name}-{}", ns.name);
        create_secret(&ns.name, &format!("key-{name}"), "api-key", &key)?;
        m["apiKeySecret"] = json!({"name": format!("key-{name}")});
        keys.insert(name, key);
    }
    let sq: StintQuota = serde_json::from_value(json!({
        "apiVersion": "copyhold.dev/v1alpha1", "kind": "StintQuota",
        "metadata": {"name": quota, "namespace": ns.name},
        "spec": spec,
    }))?;
    Api::<StintQuota>::namespaced(client().await?, &ns.name)
        .create(&PostParams::default(), &sq)
        .await?;
    Ok(Tenant {
        ns,
        quota: quota.into(),
        keys,
    })
}

impl Tenant {
    async fn quotas(&self) -> Result<Api<StintQuota>> {
        Ok(Api::namespaced(client().await?, &self.ns.name))
    }

    async fn register(&self) -> Result<StintQuotaStatus> {
        Ok(self
            .quotas()
            .await?
            .get(&self.quota)
            .await?
            .status
            .map(|mut s| {
                s.hydrate_history();
                s
            })
            .unwrap_or_default())
    }

    /// A ModelDeployment `m` (served as `tiny`) open to the quota, with one
    /// Ready serving Pod whose endpoint is the stand-in upstream at `addr`.
    async fn model(&self, addr: &str) -> Result<()> {
        let md = json!({
            "apiVersion": "copyhold.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "m", "namespace": self.ns.name},
            "spec": {
                "model": {"source": {"hostPath": {"path": "/models/tiny"}}, "format": "safetensors",
                          "servedName": "tiny",
                          "sizing": {"weightBytes": "1Mi", "kvBytesPerToken": 1024}},
                "engine": {"kind": "copyhold"},
                "replicas": 1,
                "placement": {"nodeSelector": {"copyhold.dev/test": "no-such-node"}},
                "serving": {"contextLength": 2048},
                "stintQuota": self.quota,
            }
        });
        let path = std::env::temp_dir().join(format!("{}-md.json", self.ns.name));
        std::fs::write(&path, serde_json::to_vec(&md)?)?;
        kubectl_ok(&["apply", "-f", &path.to_string_lossy()])?;
        let _ = std::fs::remove_file(&path);
        copyhold_e2e::serving_pod(&client().await?, &self.ns.name, "m", "node-0", addr).await?;
        Ok(())
    }
}

/// One chat request through the gateway; its status.
async fn chat(http: &reqwest::Client, base: &str, key: &str, content: &str) -> Result<u16> {
    let r = http
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": "tiny", "max_tokens": 64,
                      "messages": [{"role": "user", "content": content}]}))
        .send()
        .await?;
    Ok(r.status().as_u16())
}

/// Headless Chromium with a fresh profile, nothing fetched but `url`.
fn chromium(args: &[&str], url: &str) -> Result<String> {
    let profile = tempdir("chromium-profile")?;
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .output()
        .context("running chromium (Debian package `chromium`; `make test` installs it)")?;
    let _ = std::fs::remove_dir_all(&profile);
    ensure!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

fn tempdir(what: &str) -> Result<PathBuf> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let d = std::env::temp_dir().join(format!("copyhold-{what}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// The value of attribute `name` in the first tag of `html` that has it.
fn attr<'a>(html: &'a str, name: &str) -> Option<&'a str> {
    let at = html.find(&format!(" {name}=\""))? + name.len() + 3;
    let len = html[at..].find('"')?;
    Some(&html[at..at + len])
}

/// The text of the first `<tag class="class">…</tag>` in `html`.
fn text_of<'a>(html: &'a str, tag: &str, class: &str) -> Option<&'a str> {
    let open = format!("<{tag} class=\"{class}\">");
    let at = html.find(&open)? + open.len();
    let len = html[at..].find(&format!("</{tag}>"))?;
    Some(&html[at..at + len])
}

/// A member's row as the browser's DOM has it.
#[derive(Debug)]
struct Row {
    name: String,
    state: String,
    tokens_text: String,
    /// data-percent, data-scale and the fill's width (percent of the track).
    bar: Option<(f64, f64, f64)>,
}

/// The member rows of the DOM Chromium dumped, in order.
fn rows(dom: &str) -> Result<Vec<Row>> {
    let mut out = Vec::new();
    for chunk in dom.split("<tr ").skip(1) {
        let chunk = format!(" {chunk}");
        let chunk = chunk.as_str();
        let Some(name) = attr(chunk, "data-member") else {
            continue;
        };
        let row = &chunk[..chunk.find("</tr>").context("row end")?];
        let tokens = &row[row.find("class=\"use tokens\"").context("tokens cell")?..];
        let tokens = &tokens[..tokens.find("</td>").context("cell end")?];
        let bar = match attr(tokens, "data-percent") {
            None => None,
            Some(p) => {
                let scale = attr(tokens, "data-scale").context("data-scale")?;
                let style = attr(tokens, "style").context("fill style")?;
                let width = style
                    .strip_prefix("width: ")
                    .and_then(|w| w.strip_suffix('%'))
                    .with_context(|| format!("fill style {style:?}"))?;
                Some((p.parse()?, scale.parse()?, width.parse()?))
            }
        };
        out.push(Row {
            name: name.to_string(),
            state: text_of(
                row,
                "span",
                &format!("state {}", attr(row, "class").unwrap_or("")),
            )
            .unwrap_or_default()
            .to_string(),
            tokens_text: text_of(tokens, "span", "figure")
                .context("figure")?
                .to_string(),
            bar,
        });
    }
    Ok(out)
}

/// `12,345` as the English page writes it.
fn grouped(n: i64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chromium_shows_each_member_as_a_row_whose_bar_matches_its_use() -> Result<()> {
    let t = tenant(
        "reg-page",
        "commons",
        json!({
            "members": [
                {"name": "ana", "stint": {"tokens": 1000}},
                {"name": "bo", "stint": {"tokens": 250}},
                {"name": "cy"}
            ],
            "period": {"type": "calendar", "unit": "month", "timeZone": "Europe/Berlin"},
            "register": {"visibility": "public"}
        }),
    )
    .await?;
    let mut c = Command::new(env!("CARGO_BIN_EXE_copyhold-upstream-standin"));
    c.args(["--tokens", "40"]);
    let up = spawn_listening(c)?;
    t.model(&up.addr).await?;
    let gw = gateway(Some(&t.ns.name), &[])?;
    let base = format!("http://{}", gw.addr);
    let http = reqwest::Client::new();
    // The serving Pod reaches the gateway by watch.
    eventually(Duration::from_secs(20), || async {
        ensure!(chat(&http, &base, &t.keys["ana"], "hello").await? == 200);
        Ok(())
    })
    .await?;
    for i in 0..4 {
        ensure!(chat(&http, &base, &t.keys["bo"], &format!("question {i}")).await? == 200);
    }
    let reg = eventually(Duration::from_secs(10), || async {
        let r = t.register().await?;
        let req: Vec<i64> = r.members.iter().map(|m| m.requests).collect();
        ensure!(req == [1, 4, 0], "requests {req:?}");
        Ok(r)
    })
    .await?;

    let url = format!("{base}/register/{}/commons", t.ns.name);
    let dom = chromium(&["--dump-dom"], &url)?;
    let rows = rows(&dom)?;
    let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["ana", "bo", "cy"], "{dom}");
    for (row, line) in rows.iter().zip(&reg.members) {
        assert_eq!(row.name, line.name);
        assert!(line.tokens > 0 || row.name == "cy", "{line:?}");
        match line.stint_tokens {
            Some(stint) => {
                let (pct, scale, width) = row.bar.with_context(|| format!("no bar: {row:?}"))?;
                let want = (line.tokens as f64 / stint as f64 * 1000.0).round() / 10.0;
                assert_eq!(pct, want, "{row:?} against {line:?}");
                assert_eq!(scale, 120.0, "the track ends at suspendAt");
                let want_width = (want.min(scale) / scale * 100.0 * 100.0).round() / 100.0;
                assert!(
                    (width - want_width).abs() < 0.006,
                    "{row:?}: width {width} for {want} %"
                );
                let words = format!("{} of {} (", grouped(line.tokens), grouped(stint));
                assert!(row.tokens_text.starts_with(&words), "{row:?}");
                assert!(
                    row.tokens_text.ends_with(&format!("{want:.1} %)")),
                    "{row:?}"
                );
            }
            None => {
                assert!(row.bar.is_none(), "{row:?}");
                assert_eq!(row.tokens_text, "0, no stint");
            }
        }
        // The standing the sanctions (80 / 100 / 120 %) give these numbers.
        // (Not the status's `state`: a write computes it before adding that
        // write's settlements, so it can lag by one write.)
        let want_state = match line.stint_tokens.map(|s| line.tokens as f64 / s as f64) {
            Some(f) if f >= 1.2 => "suspended",
            Some(f) if f >= 1.0 => "throttled",
            Some(f) if f >= 0.8 => "warned",
            _ => "ok",
        };
        assert_eq!(row.state, want_state, "{row:?}");
    }
    // bo used 4 × (3 + 40) = 172 of 250. (The ledger admits a request only
    // against room its replica holds, so a stint is no longer overshot.)
    assert!(rows[1].bar.is_some_and(|b| b.0 > 50.0), "{:?}", rows[1]);
    assert!(dom.contains("<th scope=\"col\">"), "table semantics");
    assert!(dom.contains("Warned from 80 % of the stint"));

    // German, by ?lang= and by Accept-Language.
    let de = chromium(&["--dump-dom"], &format!("{url}?lang=de"))?;
    assert!(de.contains("<html lang=\"de\">"), "{de}");
    assert!(de.contains("Nutzung der Mitglieder in dieser Periode"));
    let de2 = chromium(&["--dump-dom", "--accept-lang=de-DE,de"], &url)?;
    assert!(de2.contains("<html lang=\"de\">"));

    // The same data as JSON.
    let j: Value = http.get(format!("{url}.json")).send().await?.json().await?;
    assert_eq!(j["members"][1]["tokens"], json!(reg.members[1].tokens));
    assert_eq!(j["visibility"], "public");
    Ok(())
}

/// GET `path` with optional headers: (status, body).
async fn get(
    http: &reqwest::Client,
    base: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String)> {
    let mut r = http.get(format!("{base}{path}"));
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let r = r.send().await?;
    Ok((r.status().as_u16(), r.text().await?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_members_key_opens_only_its_own_register_and_no_key_gets_401() -> Result<()> {
    let members =
        |n: &str| json!({"members": [{"name": n}], "period": {"type": "calendar", "unit": "day"}});
    let town = tenant("reg-town", "commons", members("ana")).await?;
    let village = tenant("reg-village", "other", members("zed")).await?;
    // Everything watched: this gateway knows both registers.
    let all = gateway(None, &[])?;
    let base = format!("http://{}", all.addr);
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let ana = format!("Bearer {}", town.keys["ana"]);
    let zed = format!("Bearer {}", village.keys["zed"]);
    let town_path = format!("/register/{}/commons", town.ns.name);
    let village_path = format!("/register/{}/other", village.ns.name);

    // A key's own register, once the gateway has read both keys.
    eventually(Duration::from_secs(20), || async {
        let (st, _) = get(&http, &base, &village_path, &[("authorization", &zed)]).await?;
        ensure!(st == 200, "zed: {st}");
        let (st, _) = get(&http, &base, &town_path, &[("authorization", &ana)]).await?;
        ensure!(st == 200, "ana: {st}");
        Ok(())
    })
    .await?;
    // The listing through ana's key is ana's register alone.
    let (st, body) = get(&http, &base, "/register.json", &[("authorization", &ana)]).await?;
    assert_eq!(st, 200, "{body}");
    let v: Value = serde_json::from_str(&body)?;
    let regs = v["registers"].as_array().context("registers")?;
    assert_eq!(regs.len(), 1, "{body}");
    assert_eq!(regs[0]["namespace"], json!(town.ns.name));
    assert_eq!(regs[0]["members"][0]["name"], "ana");
    let (st, html) = get(&http, &base, "/register", &[("authorization", &ana)]).await?;
    assert_eq!(st, 200);
    assert!(html.contains(&format!("id=\"{}-commons\"", town.ns.name)));
    assert!(
        !html.contains("zed") && !html.contains(&village.ns.name),
        "{html}"
    );
    // Another tenant's register: not found, as if it did not exist.
    for p in [village_path.clone(), format!("{village_path}.json")] {
        let (st, body) = get(&http, &base, &p, &[("authorization", &ana)]).await?;
        assert_eq!(st, 404, "{p}: {body}");
        assert!(!body.contains("zed"));
    }

    // Without a key: 401, page and JSON, one register or the listing.
    let (st, html) = get(&http, &base, &town_path, &[]).await?;
    assert_eq!(st, 401);
    assert!(
        html.contains("action=\"/register/key\""),
        "the sign-in form"
    );
    assert!(!html.contains("ana"));
    let (st, _) = get(&http, &base, &format!("{town_path}.json"), &[]).await?;
    assert_eq!(st, 401);
    let only_town = gateway(Some(&town.ns.name), &[])?;
    let only_town = format!("http://{}", only_town.addr);
    for p in ["/register", "/register.json"] {
        let (st, _) = get(&http, &only_town, p, &[]).await?;
        assert_eq!(st, 401, "{p}");
    }
    // A key nobody holds: 401 too.
    let (st, _) = get(
        &http,
        &base,
        &town_path,
        &[("authorization", "Bearer sk-nobody")],
    )
    .await?;
    assert_eq!(st, 401);

    // The form: zed's key becomes a cookie that opens zed's register only.
    let r = http
        .post(format!("{base}/register/key"))
        .form(&[("key", village.keys["zed"].as_str()), ("lang", "en")])
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 303);
    let cookie = r
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .context("set-cookie")?
        .to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().context("cookie")?.to_string();
    let (st, html) = get(&http, &base, "/register", &[("cookie", &pair)]).await?;
    assert_eq!(st, 200);
    assert!(html.contains(&format!("id=\"{}-other\"", village.ns.name)) && html.contains("zed"));
    assert!(!html.contains(&town.ns.name), "{html}");
    let (st, _) = get(&http, &base, &town_path, &[("cookie", &pair)]).await?;
    assert_eq!(st, 404);
    let r = http
        .post(format!("{base}/register/key"))
        .form(&[("key", "sk-guess")])
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 401);
    assert!(r.text().await?.contains("No member holds that key."));

    // `cluster`: loopback is inside by default; a gateway told that the
    // cluster is 10.0.0.0/8 refuses the same client.
    village
        .quotas()
        .await?
        .patch(
            "other",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"register": {"visibility": "cluster"}}})),
        )
        .await?;
    eventually(Duration::from_secs(10), || async {
        let (st, body) = get(&http, &base, &village_path, &[]).await?;
        ensure!(st == 200 && body.contains("zed"), "{st}");
        Ok(())
    })
    .await?;
    let outside = gateway(
        Some(&village.ns.name),
        &["--register-cluster-cidrs", "10.0.0.0/8"],
    )?;
    let (st, body) = get(
        &http,
        &format!("http://{}", outside.addr),
        &village_path,
        &[],
    )
    .await?;
    assert_eq!(st, 403, "{body}");
    assert!(!body.contains("zed"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_ledger_keeps_each_members_last_periods_at_each_rollover() -> Result<()> {
    // Rolling 3 s periods and a 4 s TTL (a heartbeat write every second):
    // the gateway's own writes roll the register over every 3 s.
    let t = tenant(
        "reg-history",
        "commons",
        json!({
            "members": [{"name": "ana"}, {"name": "bo"}],
            "period": {"type": "rolling", "window": "3s"},
            "ledger": {"replicaTtlSeconds": 4},
            "register": {"visibility": "public", "historyPeriods": 2}
        }),
    )
    .await?;
    let mut c = Command::new(env!("CARGO_BIN_EXE_copyhold-upstream-standin"));
    c.args(["--tokens", "7"]);
    let up = spawn_listening(c)?;
    t.model(&up.addr).await?;
    let gw = gateway(Some(&t.ns.name), &[])?;
    let base = format!("http://{}", gw.addr);
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(20), || async {
        ensure!(chat(&http, &base, &t.keys["ana"], "hello").await? == 200);
        Ok(())
    })
    .await?;
    // ana's request lands in one period; a later rollover closes it into
    // her history with exactly what was settled.
    let first = eventually(Duration::from_secs(15), || async {
        let r = t.register().await?;
        let ana = r.members.first().context("ana")?;
        let used = ana.history.iter().find(|h| h.requests == 1);
        ensure!(used.is_some(), "history {:?}", ana.history);
        Ok(used.cloned())
    })
    .await?
    .context("period")?;
    ensure!(first.tokens > 0, "{first:?}");
    // Rollovers go on; the history stays at two periods, oldest first, and
    // bo's idle periods are kept as zeros.
    let r = eventually(Duration::from_secs(20), || async {
        let r = t.register().await?;
        let ana = &r.members[0];
        ensure!(
            ana.history.len() == 2 && ana.history.iter().all(|h| h.requests == 0),
            "{:?}",
            ana.history
        );
        Ok(r)
    })
    .await?;
    let h = &r.members[1].history;
    assert_eq!(h.len(), 2);
    assert!(h[0].end <= h[1].start, "oldest first: {h:?}");
    // The page serves it.
    let j: Value = http
        .get(format!("{base}/register/{}/commons.json", t.ns.name))
        .send()
        .await?
        .json()
        .await?;
    assert!(
        j["members"][0]["history"]
            .as_array()
            .is_some_and(|a| !a.is_empty()),
        "{j}"
    );
    Ok(())
}

/// `COPYHOLD_REGISTER_SCREENSHOT=docs/register.png` writes the README's
/// screenshot: a register of four members over a month, as gateways would
/// have written it, and an EnergyBudget with a day of solar supply, as the
/// energy controller would have written it; both are written by this test
/// so the picture is the same on every run. Without the variable the same
/// page is still taken and checked to be a picture.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_readme_screenshot_is_taken_from_a_served_page() -> Result<()> {
    let t = tenant(
        "riverside-coop",
        "commons",
        json!({
            "members": [
                {"name": "bakery", "stint": {"tokens": 200000, "energyWh": 400}},
                {"name": "library", "stint": {"tokens": 120000}},
                {"name": "school", "stint": {"tokens": 300000}},
                {"name": "clinic", "stint": {"tokens": 80000}}
            ],
            "period": {"type": "calendar", "unit": "month", "timeZone": "Europe/Berlin"},
            "register": {"visibility": "public"}
        }),
    )
    .await?;
    let api = t.quotas().await?;
    let spec = api.get("commons").await?.spec;
    let now = jiff::Timestamp::now();
    let period = copyhold::commons::stint::current_period(&spec, now)?;
    // The four calendar months before this one, oldest first.
    let mut months = Vec::new();
    let mut p = period;
    for _ in 0..4 {
        p = copyhold::commons::stint::current_period(
            &spec,
            p.start - jiff::SignedDuration::from_secs(1),
        )?;
        months.push(p);
    }
    months.reverse();
    let past = |base: i64| {
        months
            .iter()
            .enumerate()
            .map(|(k, m)| {
                let tokens = base + 9000 * ((k as i64 * 7) % 4) - 4000;
                json!({"start": m.start.to_string(), "end": m.end.to_string(),
                       "tokens": tokens, "energyWh": tokens as f64 / 900.0,
                       "requests": tokens / 700})
            })
            .collect::<Vec<_>>()
    };
    let line = |name: &str, tokens: i64, wh: f64, req: i64, base: i64| {
        json!({"name": name, "tokens": tokens, "promptTokens": tokens * 2 / 3,
               "completionTokens": tokens - tokens * 2 / 3, "energyWh": wh, "requests": req,
               "history": past(base)})
    };
    let status = json!({
        "periodStart": period.start.to_string(),
        "resetsAt": period.end.to_string(),
        "members": [
            line("bakery", 61250, 121.5, 212, 150000),
            line("library", 101800, 180.0, 388, 98000),
            line("school", 133000, 240.2, 505, 240000),
            line("clinic", 93100, 150.7, 301, 70000),
        ]
    });
    let mut sq = api.get_status("commons").await?;
    sq.status = Some(serde_json::from_value(status)?);
    api.replace_status("commons", &PostParams::default(), &sq)
        .await?;
    // A ModelDeployment of the quota, covered by a budget.
    let md = json!({
        "apiVersion": "copyhold.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "m", "namespace": t.ns.name},
        "spec": {
            "model": {"source": {"hostPath": {"path": "/models/tiny"}}, "format": "safetensors",
                      "sizing": {"weightBytes": "1Mi", "kvBytesPerToken": 1024}},
            "engine": {"kind": "copyhold"}, "replicas": 1,
            "placement": {"nodeSelector": {"copyhold.dev/test": "no-such-node"}},
            "serving": {"contextLength": 2048}, "stintQuota": "commons"
        }
    });
    let p = std::env::temp_dir().join(format!("{}-md.json", t.ns.name));
    std::fs::write(&p, md.to_string())?;
    kubectl_ok(&["apply", "-f", &p.to_string_lossy()])?;
    let eb_name = format!("{}-rooftop-solar", t.ns.name);
    let eb = json!({
        "apiVersion": "copyhold.dev/v1alpha1", "kind": "EnergyBudget",
        "metadata": {"name": eb_name},
        "spec": {"nodeSelector": {"copyhold.dev/test": eb_name}, "ceilingWatts": 3000,
                 "supply": {"static": {"watts": 2000}}}
    });
    std::fs::write(&p, eb.to_string())?;
    kubectl_ok(&["apply", "-f", &p.to_string_lossy()])?;
    let _ = std::fs::remove_file(&p);
    // A day in 15-minute points: a solar curve, and a draw that follows
    // the co-op's working hours.
    let bucket = now.as_second() - now.as_second().rem_euclid(900);
    let history: Vec<Value> = (0..96)
        .rev()
        .map(|i| {
            let at = bucket - i * 900;
            let hour = ((at.rem_euclid(86400)) as f64) / 3600.0 + 1.0;
            let sun = ((hour - 6.0) / 14.0 * std::f64::consts::PI).sin().max(0.0);
            let supply = (150.0 + 2300.0 * sun).round();
            let work = if (8.0..19.0).contains(&hour) {
                900.0
            } else {
                250.0
            };
            let draw = (work + 180.0 * (hour * 1.7).sin()).round();
            json!({"at": jiff::Timestamp::from_second(at).unwrap_or(now).to_string(),
                   "supplyWatts": supply, "drawWatts": draw, "evaluations": 60})
        })
        .collect();
    let last = history.last().cloned().unwrap_or_default();
    let ebs: Api<EnergyBudget> = Api::all(client().await?);
    let gw = gateway(Some(&t.ns.name), &[])?;
    let url = format!("http://{}/register/{}/commons", gw.addr, t.ns.name);
    let key = format!("{}/m", t.ns.name);
    // A controller of another test may evaluate this budget too: write the
    // status until the page shows it.
    let result = eventually(Duration::from_secs(20), || async {
        ebs.patch_status(
            &eb_name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "state": "WithinBudget", "step": 0, "transitions": 0, "covered": [key],
                "supplyWatts": last["supplyWatts"], "drawWatts": last["drawWatts"],
                "allowanceWatts": (last["supplyWatts"].as_f64().unwrap_or(0.0) * 0.8).round(),
                "history": history}})),
        )
        .await?;
        let dom = chromium(&["--dump-dom"], &url)?;
        ensure!(dom.contains("<polyline class=\"supply\""), "no chart yet");
        ensure!(dom.contains("data-member=\"clinic\""), "no rows yet");
        Ok(())
    })
    .await;
    if result.is_ok() {
        let dir = tempdir("shot")?;
        let png = dir.join("register.png");
        chromium(
            &[
                &format!("--screenshot={}", png.display()),
                "--window-size=1100,1060",
            ],
            &url,
        )?;
        let bytes = std::fs::read(&png)?;
        ensure!(
            bytes.starts_with(b"\x89PNG") && bytes.len() > 20_000,
            "not a picture"
        );
        if let Some(to) = std::env::var_os("COPYHOLD_REGISTER_SCREENSHOT") {
            let to = Path::new(&to);
            let to = if to.is_absolute() {
                to.to_path_buf()
            } else {
                workspace_root().join(to)
            };
            std::fs::copy(&png, &to)?;
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    let _ = kubectl_ok(&["delete", "energybudget", &eb_name, "--wait=false"]);
    result.map_err(|e| e.context("the page never showed the register and its chart"))?;
    Ok(())
}
