//! Processes the gateway tests start: servers that print where they
//! listen, and a private API server that a test may restart.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kube::Config;
use kube::config::{KubeConfigOptions, Kubeconfig};

use super::{ChildGuard, cache_dir, kubeconfig};

/// A process that printed `... listening on ADDR ...` once it served.
pub struct Listening {
    pub guard: ChildGuard,
    pub addr: String,
    /// That first line (the gateway ends it with its identity).
    pub line: String,
}

/// Starts `cmd` and waits for its first line of output, the one naming its
/// address; the rest of its output is drained so it never blocks.
pub fn spawn_listening(mut cmd: Command) -> Result<Listening> {
    let mut child: Child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut reader = BufReader::new(stdout);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let guard = ChildGuard(child);
    let addr = line
        .split_whitespace()
        .skip_while(|w| *w != "on")
        .nth(1)
        .with_context(|| format!("no address in {line:?}"))?
        .to_string();
    std::thread::spawn(move || {
        let mut sink = String::new();
        while reader.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
            sink.clear();
        }
    });
    Ok(Listening { guard, addr, line })
}

/// A second kube-apiserver over the local control plane's etcd, with the
/// same certificates and tokens on another port: a test restarts it (a
/// real API server restart: connections cut, watches broken, requests
/// refused) without disturbing the tests that use the shared one.
pub struct PrivateApiServer {
    args: Vec<String>,
    child: Option<ChildGuard>,
    kubeconfig: PathBuf,
}

impl PrivateApiServer {
    /// Starts one beside `e2e/cluster.sh`'s API server (whose command line
    /// it copies), and writes a kubeconfig for it.
    pub async fn start(dir: &Path) -> Result<PrivateApiServer> {
        let run = cache_dir().join("run");
        let pid = std::fs::read_to_string(run.join("kube-apiserver.pid"))
            .context("no local control plane (e2e/cluster.sh up) to start an API server beside")?;
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", pid.trim()))
            .context("the local API server's command line")?;
        let mut args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let port = free_port()?;
        let mut old_port = None;
        for a in args.iter_mut() {
            if let Some(p) = a.strip_prefix("--secure-port=") {
                old_port = Some(p.to_string());
                *a = format!("--secure-port={port}");
            }
        }
        let old_port = old_port.context("the API server's --secure-port")?;
        let kc = std::fs::read_to_string(kubeconfig()?)?;
        let from = format!("https://127.0.0.1:{old_port}");
        if !kc.contains(&from) {
            bail!("the kubeconfig does not name {from}");
        }
        let path = dir.join("private-apiserver.kubeconfig");
        std::fs::write(
            &path,
            kc.replace(&from, &format!("https://127.0.0.1:{port}")),
        )?;
        let mut s = PrivateApiServer {
            args,
            child: None,
            kubeconfig: path,
        };
        s.up().await?;
        Ok(s)
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Kills it (SIGKILL), keeps it down for `down`, starts it again and
    /// waits until it is ready.
    pub async fn restart(&mut self, down: Duration) -> Result<()> {
        self.child = None;
        tokio::time::sleep(down).await;
        self.up().await
    }

    /// A client of this API server.
    pub async fn client(&self) -> Result<kube::Client> {
        let kc = Kubeconfig::read_from(&self.kubeconfig)?;
        let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
        Ok(kube::Client::try_from(config)?)
    }

    async fn up(&mut self) -> Result<()> {
        let (exe, rest) = self.args.split_first().context("empty command line")?;
        let child = Command::new(exe)
            .args(rest)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {exe}"))?;
        self.child = Some(ChildGuard(child));
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(c) = self.client().await
                && c.apiserver_version().await.is_ok()
            {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                bail!("the private API server was not ready within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// A port free on loopback now.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
