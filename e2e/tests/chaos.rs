//! The stint ledger under every fault at once (issue 18's chaos test): three
//! `copyhold gateway` replicas whose clocks differ by up to 5 s
//! (libfaketime, `e2e/faketime-install.sh`), five members with stints, 64
//! streaming clients, a replica killed (SIGKILL) every few seconds and
//! started again, and the API server the replicas talk to restarted once (a
//! private kube-apiserver over the local control plane's etcd, so no other
//! test sees it go). Afterwards, for every member: the register is at least
//! what the clients were served, and the over-count is at most what the
//! ledger reclaimed from the killed replicas' slices, which is at most one
//! slice and one reservation per kill.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use copyhold::commons::ledger_leases::ReplicaSlices;
use copyhold::gateway::slice_leases::{SLICES_ANNOTATION, SLICES_LABEL, quota_label};
use copyhold::resources::stint_quota::{StintQuota, StintQuotaStatus};
use copyhold_e2e::processes::{Listening, PrivateApiServer, spawn_listening};
use copyhold_e2e::{
    TestNamespace, client, create_secret, eventually, install_crds, kubectl_ok, local_cluster,
    serving_pod, workspace_bin,
};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, ListParams, PostParams};
use serde_json::{Value, json};
use tokio::sync::RwLock;

const FAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";
/// The replicas' clocks against the real one.
const SKEWS: [&str; 3] = ["-5s", "+0s", "+5s"];
const MEMBERS: [&str; 5] = ["ana", "bo", "cy", "di", "ed"];
const STINT: i64 = 5_000_000;
const MAX_TOKENS: i64 = 16;
const CLIENTS: usize = 64;
const RUN: Duration = Duration::from_secs(30);
const KILL_EVERY: Duration = Duration::from_secs(4);

/// What the clients saw of one member: tokens they were streamed
/// (completed streams by their usage; streams cut by a kill by the
/// content chunks that arrived, one token each), and how many streams.
#[derive(Debug, Default, Clone)]
struct Served {
    tokens: i64,
    complete: i64,
    cut: i64,
    refused: i64,
}

/// One replica, restartable: its clock skew, its identity.
struct Replica {
    skew: &'static str,
    identity: String,
    proc: Option<Listening>,
}

fn start_replica(ns: &str, kubeconfig: &std::path::Path, r: &Replica) -> Result<Listening> {
    let mut c = Command::new(workspace_bin("copyhold", "copyhold")?);
    c.args(["gateway", "--listen", "127.0.0.1:0"])
        .args(["--metrics-addr", "127.0.0.1:0", "--eject-seconds", "30"])
        .args(["--watch-namespace", ns, "--identity", &r.identity])
        .env("KUBECONFIG", kubeconfig)
        .env("LD_PRELOAD", FAKETIME)
        .env("FAKETIME", r.skew)
        // Timers and timeouts keep the real monotonic clock.
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .env("RUST_LOG", "error");
    spawn_listening(c)
}

/// A streamed chat: `Ok(Some(tokens))` complete (by its usage),
/// `Ok(None)` refused, `Err(tokens seen)` cut on the way.
async fn stream(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    n: usize,
) -> Result<Option<i64>, i64> {
    let body = json!({"model": "tiny",
        "messages": [{"role": "user", "content": format!("chaos request {n}")}],
        "max_tokens": MAX_TOKENS, "stream": true, "stream_options": {"include_usage": true}});
    let r = match http
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
    {
        Ok(r) => r,
        // Never reached a replica (killed, restarting): nothing served.
        Err(_) => return Ok(None),
    };
    if r.status() != 200 {
        return Ok(None);
    }
    let mut text = String::new();
    let mut chunks = 0i64;
    let mut usage = None;
    let mut body = r.bytes_stream();
    while let Some(chunk) = body.next().await {
        let Ok(chunk) = chunk else {
            return Err(chunks);
        };
        text.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(i) = text.find('\n') {
            let line: String = text.drain(..=i).collect();
            let Some(data) = line.trim().strip_prefix("data: ") else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<Value>(data) else {
                continue;
            };
            if v.pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
                .is_some_and(|c| !c.is_empty())
            {
                chunks += 1;
            }
            if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                let (p, c) = (u["prompt_tokens"].as_i64(), u["completion_tokens"].as_i64());
                usage = p.zip(c).map(|(p, c)| p + c);
            }
        }
    }
    match usage {
        Some(t) => Ok(Some(t)),
        None => Err(chunks),
    }
}

/// 64 clients, each streaming for one member after another to the live
/// replicas in turn, until `stop`.
async fn clients(
    bases: Arc<RwLock<Vec<String>>>,
    keys: Arc<Vec<(String, String)>>,
    stop: Arc<AtomicBool>,
) -> BTreeMap<String, Served> {
    let http = reqwest::Client::new();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (http, bases, keys, stop) = (http.clone(), bases.clone(), keys.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut seen: BTreeMap<String, Served> = BTreeMap::new();
            let mut n = c;
            while !stop.load(Ordering::Relaxed) {
                let (member, key) = &keys[n % keys.len()];
                let base = {
                    let b = bases.read().await;
                    b[n % b.len()].clone()
                };
                let s = seen.entry(member.clone()).or_default();
                match stream(&http, &base, key, n).await {
                    Ok(Some(t)) => {
                        s.tokens += t;
                        s.complete += 1;
                    }
                    Ok(None) => {
                        s.refused += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(t) => {
                        s.tokens += t;
                        s.cut += 1;
                    }
                }
                n += CLIENTS;
            }
            seen
        }));
    }
    let mut all: BTreeMap<String, Served> = BTreeMap::new();
    for t in tasks {
        for (m, s) in t.await.unwrap_or_default() {
            let a = all.entry(m).or_default();
            a.tokens += s.tokens;
            a.complete += s.complete;
            a.cut += s.cut;
            a.refused += s.refused;
        }
    }
    all
}

/// The scene: members with stints and keys, the quota, the model and two
/// stand-in upstreams serving it.
async fn scene(
    ns: &TestNamespace,
    kube: &kube::Client,
) -> Result<(Vec<(String, String)>, Vec<Listening>)> {
    let mut keys = Vec::new();
    let mut members = Vec::new();
    for m in MEMBERS {
        let key = format!("sk-{m}-{}", ns.name);
        create_secret(&ns.name, &format!("key-{m}"), "api-key", &key)?;
        keys.push((m.to_string(), key));
        members.push(
            json!({"name": m, "apiKeySecret": {"name": format!("key-{m}")},
                            "stint": {"tokens": STINT}}),
        );
    }
    let sq: StintQuota = serde_json::from_value(json!({
        "apiVersion": "copyhold.dev/v1alpha1", "kind": "StintQuota",
        "metadata": {"name": "commons", "namespace": ns.name},
        "spec": {"members": members, "period": {"type": "calendar", "unit": "day"},
                 "ledger": {"replicaTtlSeconds": 6}},
    }))?;
    Api::<StintQuota>::namespaced(kube.clone(), &ns.name)
        .create(&PostParams::default(), &sq)
        .await?;
    let md = json!({
        "apiVersion": "copyhold.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "m", "namespace": ns.name},
        "spec": {
            "model": {"source": {"hostPath": {"path": "/models/tiny"}}, "format": "safetensors",
                      "servedName": "tiny", "sizing": {"weightBytes": "1Mi", "kvBytesPerToken": 1024}},
            "engine": {"kind": "copyhold"}, "replicas": 1,
            "placement": {"nodeSelector": {"copyhold.dev/test": "no-such-node"}},
            "serving": {"contextLength": 2048}, "stintQuota": "commons",
        }
    });
    let path = std::env::temp_dir().join(format!("{}-md.json", ns.name));
    std::fs::write(&path, serde_json::to_vec(&md)?)?;
    kubectl_ok(&["apply", "-f", &path.to_string_lossy()])?;
    let _ = std::fs::remove_file(&path);
    let mut ups = Vec::new();
    for i in 0..2 {
        let mut c = Command::new(env!("CARGO_BIN_EXE_copyhold-upstream-standin"));
        c.args([
            "--tokens",
            &MAX_TOKENS.to_string(),
            "--token-delay-ms",
            "20",
        ]);
        let up = spawn_listening(c)?;
        serving_pod(kube, &ns.name, "m", &format!("up-{i}"), &up.addr).await?;
        ups.push(up);
    }
    Ok((keys, ups))
}

/// Every member's weighted tokens in the register: this period's and any
/// period that rolled over during the run.
fn registered(st: &StintQuotaStatus) -> BTreeMap<String, (i64, i64)> {
    st.members
        .iter()
        .map(|m| {
            let history: i64 = m.history.iter().map(|h| h.tokens).sum();
            (m.name.clone(), (m.tokens + history, m.reclaimed_tokens))
        })
        .collect()
}

/// The scene and its processes: the private API server, the replicas.
struct Chaos {
    ns: TestNamespace,
    kube: kube::Client,
    api: PrivateApiServer,
    dir: std::path::PathBuf,
    keys: Vec<(String, String)>,
    replicas: Vec<Replica>,
    bases: Arc<RwLock<Vec<String>>>,
    _ups: Vec<Listening>,
}

/// What the chaos did.
#[derive(Default)]
struct Faults {
    kills: usize,
    api_down: Option<Duration>,
    /// What the killed replicas held per member when killed.
    held: BTreeMap<String, i64>,
}

impl Chaos {
    async fn start() -> Result<Chaos> {
        install_crds().await?;
        let ns = TestNamespace::create("chaos")?;
        let kube = client().await?;
        let dir = std::env::temp_dir().join(format!("{}-api", ns.name));
        std::fs::create_dir_all(&dir)?;
        let api = PrivateApiServer::start(&dir).await?;
        let (keys, ups) = scene(&ns, &kube).await?;
        let mut replicas: Vec<Replica> = SKEWS
            .iter()
            .enumerate()
            .map(|(i, skew)| Replica {
                skew,
                identity: format!("chaos-{i}"),
                proc: None,
            })
            .collect();
        for r in replicas.iter_mut() {
            r.proc = Some(start_replica(&ns.name, api.kubeconfig(), r)?);
        }
        let bases = Arc::new(RwLock::new(replicas.iter().map(base).collect()));
        Ok(Chaos {
            ns,
            kube,
            api,
            dir,
            keys,
            replicas,
            bases,
            _ups: ups,
        })
    }

    /// One request through every replica, so each serves before the chaos;
    /// the tokens they were served.
    async fn warm_up(&self) -> Result<i64> {
        let http = reqwest::Client::new();
        let mut warm = 0;
        for b in self.bases.read().await.iter() {
            warm += eventually(Duration::from_secs(30), || async {
                match stream(&http, b, &self.keys[0].1, 0).await {
                    Ok(Some(t)) => Ok(t),
                    // A cut warm-up would leave a charge nobody counts.
                    Err(t) => anyhow::bail!("{b}: a warm-up stream was cut after {t} tokens"),
                    Ok(None) => anyhow::bail!("{b} not serving yet"),
                }
            })
            .await?;
        }
        Ok(warm)
    }

    /// Kills a replica every few seconds and starts it again, and restarts
    /// the API server once, halfway through.
    async fn faults(&mut self) -> Result<Faults> {
        let mut f = Faults::default();
        let start = Instant::now();
        while start.elapsed() < RUN {
            tokio::time::sleep(KILL_EVERY).await;
            let i = f.kills % self.replicas.len();
            if let Some(mut p) = self.replicas[i].proc.take() {
                p.guard.0.kill()?;
                let _ = p.guard.0.wait();
                let identity = p.line.split_whitespace().last().unwrap_or_default();
                for (m, t) in settled_held_by(&self.kube, &self.ns.name, identity).await? {
                    *f.held.entry(m).or_default() += t;
                }
            }
            f.kills += 1;
            let r = &mut self.replicas[i];
            r.proc = Some(start_replica(&self.ns.name, self.api.kubeconfig(), r)?);
            self.bases.write().await[i] = base(r);
            if f.api_down.is_none() && start.elapsed() >= RUN / 2 {
                let t = Instant::now();
                self.api.restart(Duration::from_secs(3)).await?;
                f.api_down = Some(t.elapsed());
            }
        }
        Ok(f)
    }

    async fn register(&self) -> Result<BTreeMap<String, (i64, i64)>> {
        let sq = Api::<StintQuota>::namespaced(self.kube.clone(), &self.ns.name)
            .get("commons")
            .await?;
        Ok(registered(&sq.status.unwrap_or_default()))
    }

    /// The register once settled (the killed replicas' slices reclaimed
    /// after their 6 s TTL, the live ones' usage written: two reads 8 s
    /// apart agree) and at least what was served.
    async fn settled(
        &self,
        served: &BTreeMap<String, Served>,
    ) -> Result<BTreeMap<String, (i64, i64)>> {
        let r = eventually(Duration::from_secs(90), || async {
            let a = self.register().await?;
            tokio::time::sleep(Duration::from_secs(8)).await;
            let b = self.register().await?;
            ensure!(a == b, "the register still moves");
            for (m, s) in served {
                let got = b.get(m).map_or(0, |x| x.0);
                ensure!(got >= s.tokens, "{m}: register {got} < served {}", s.tokens);
            }
            Ok(b)
        })
        .await;
        match r {
            Ok(r) => Ok(r),
            Err(e) => {
                let now = self.register().await?;
                Err(e.context(format!("served {served:?}; register {now:?}")))
            }
        }
    }
}

impl Drop for Chaos {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What a killed `replica` held per member, once its slice Lease stops
/// changing: a write the replica sent just before the SIGKILL can still
/// land on a loaded API server after a first read (seen: the ledger then
/// reclaimed 3,616 tokens more than that read showed). Two reads 0.5 s
/// apart must agree, all within 4 s (the reclaim deletes the Lease after
/// its 6 s TTL; a Lease already gone leaves the last read).
async fn settled_held_by(
    kube: &kube::Client,
    ns: &str,
    replica: &str,
) -> Result<BTreeMap<String, i64>> {
    let mut last = held_by(kube, ns, replica).await?;
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = held_by(kube, ns, replica).await?;
        // Equal, or already reclaimed and deleted: the last read stands.
        if now == last || now.is_empty() {
            break;
        }
        last = now;
    }
    Ok(last)
}

/// What `replica` held per member in its slice Lease (nothing else writes
/// that Lease; the reclaim deletes it).
async fn held_by(kube: &kube::Client, ns: &str, replica: &str) -> Result<BTreeMap<String, i64>> {
    let leases: Api<Lease> = Api::namespaced(kube.clone(), ns);
    let selector = format!("{SLICES_LABEL}={}", quota_label("commons"));
    for l in leases
        .list(&ListParams::default().labels(&selector))
        .await?
    {
        let Some(a) = l
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(SLICES_ANNOTATION))
        else {
            continue;
        };
        let held: ReplicaSlices = serde_json::from_str(a)?;
        if held.replica == replica {
            return Ok(held.slices.into_iter().map(|(m, (t, _))| (m, t)).collect());
        }
    }
    Ok(BTreeMap::new())
}

fn base(r: &Replica) -> String {
    format!("http://{}", r.proc.as_ref().map_or("", |p| &p.addr))
}

/// Prints the figures; checks, per member: register ≥ served, over-count ≤
/// what the killed replicas held, reclaimed ≤ what they held (charged once).
fn judge(
    served: &BTreeMap<String, Served>,
    reg: &BTreeMap<String, (i64, i64)>,
    f: &Faults,
    seconds: f64,
) -> Result<()> {
    println!(
        "chaos: 3 replicas (clocks {SKEWS:?}), {} members with stints of {STINT}, {CLIENTS} streaming clients, {seconds:.0} s",
        MEMBERS.len(),
    );
    println!(
        "chaos: {} kills (one every {} s), API server restarted once (down {:.1} s)",
        f.kills,
        KILL_EVERY.as_secs(),
        f.api_down.map_or(0.0, |d| d.as_secs_f64())
    );
    println!(
        "{:<6} {:>8} {:>5} {:>7} {:>8} {:>8} {:>6} {:>9} {:>11}",
        "member",
        "complete",
        "cut",
        "refused",
        "served",
        "register",
        "over",
        "reclaimed",
        "held@kills"
    );
    for m in MEMBERS {
        let s = served.get(m).cloned().unwrap_or_default();
        let (got, reclaimed) = reg.get(m).copied().unwrap_or_default();
        let held = f.held.get(m).copied().unwrap_or_default();
        let over = got - s.tokens;
        println!(
            "{m:<6} {:>8} {:>5} {:>7} {:>8} {got:>8} {over:>6} {reclaimed:>9} {held:>11}",
            s.complete, s.cut, s.refused, s.tokens
        );
        ensure!(over >= 0, "{m}: register {got} below served {}", s.tokens);
        ensure!(
            over <= held,
            "{m}: over-count {over} > the killed replicas' slices {held}"
        );
        ensure!(
            reclaimed <= held,
            "{m}: reclaimed {reclaimed} > held at the kills {held}"
        );
        ensure!(s.complete > 0, "{m} was never served");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_register_never_under_counts_under_kills_skewed_clocks_and_an_api_server_restart()
-> Result<()> {
    ensure!(
        std::path::Path::new(FAKETIME).is_file(),
        "libfaketime is missing: run e2e/faketime-install.sh"
    );
    ensure!(
        local_cluster()?,
        "the chaos test starts an API server beside e2e/cluster.sh's control plane"
    );
    let mut c = Chaos::start().await?;
    let warm = c.warm_up().await?;
    let stop = Arc::new(AtomicBool::new(false));
    let keys = Arc::new(c.keys.clone());
    let load = tokio::spawn(clients(c.bases.clone(), keys, stop.clone()));
    let start = Instant::now();
    let faults = c.faults().await?;
    stop.store(true, Ordering::Relaxed);
    let mut served = load.await?;
    served.entry(c.keys[0].0.clone()).or_default().tokens += warm;
    let reg = c.settled(&served).await?;
    judge(&served, &reg, &faults, start.elapsed().as_secs_f64())
}
