//! `copyhold-node serve` stops on SIGTERM when it is a container's first
//! process (PID 1 of its PID namespace), as in every Pod. The kernel gives
//! such a process no default action for SIGTERM: without a handler the
//! signal is dropped and the kubelet waits out the grace period, then kills.
//!
//! Needs root (a new PID namespace through `unshare`); skips, saying why,
//! otherwise.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::fixtures;

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|v| v.split_whitespace().next() == Some("0"))
        })
        .unwrap_or(false)
}

/// The host PID of `parent`'s only child (the namespace's PID 1).
fn child_of(parent: u32) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

#[test]
fn serve_stops_on_sigterm_as_the_first_process_of_a_pid_namespace() {
    if !is_root() {
        eprintln!("SKIPPED: a new PID namespace needs root");
        return;
    }
    let model = fixtures().join("tiny-llama");
    let mut unshare = Command::new("unshare")
        .args(["--pid", "--fork", "--kill-child"])
        .arg(env!("CARGO_BIN_EXE_copyhold-node"))
        .args([
            "serve",
            "--device",
            "cpu",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ])
        .arg("--model")
        .arg(&model)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("unshare runs");
    // The first line says where it listens: it is up and its handlers are set.
    let mut line = String::new();
    BufReader::new(unshare.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("a line");
    assert!(line.contains("listening"), "{line}");
    let pid1 = child_of(unshare.id()).expect("the namespace's first process");
    let st = Command::new("kill")
        .args(["-TERM", &pid1.to_string()])
        .status()
        .expect("kill");
    assert!(st.success());
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        if let Ok(Some(_)) = unshare.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = unshare.kill();
    let _ = unshare.wait();
    panic!("copyhold-node (PID 1 of its namespace) still ran 10 s after SIGTERM");
}

/// A model folder whose `config.json` is a FIFO nobody writes: reading it
/// blocks, as on a network volume that stalls, so the load never ends.
fn a_model_that_never_finishes_loading() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("copyhold-stalled-model-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    let src = fixtures().join("tiny-llama");
    for e in std::fs::read_dir(&src).expect("fixture") {
        let e = e.expect("entry");
        if e.file_name() != "config.json" {
            std::fs::copy(e.path(), d.join(e.file_name())).expect("copy");
        }
    }
    let st = Command::new("mkfifo")
        .arg(d.join("config.json"))
        .status()
        .expect("mkfifo");
    assert!(st.success());
    d
}

/// A stop asked for while the weights still load ends the node at once
/// and cleanly (exit 0, not killed by the signal), instead of after a
/// load that may take minutes, or never end.
#[test]
fn serve_stops_on_sigterm_while_its_model_is_still_loading() {
    let model = a_model_that_never_finishes_loading();
    let mut node = Command::new(env!("CARGO_BIN_EXE_copyhold-node"))
        .args(["serve", "--device", "cpu", "--host", "127.0.0.1"])
        .args(["--port", "0", "--model"])
        .arg(&model)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("copyhold-node runs");
    let mut line = String::new();
    BufReader::new(node.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("a line");
    assert!(line.contains("listening"), "{line}");
    // Loading has begun and blocks on the FIFO.
    std::thread::sleep(Duration::from_millis(300));
    let st = Command::new("kill")
        .args(["-TERM", &node.id().to_string()])
        .status()
        .expect("kill");
    assert!(st.success());
    let t0 = Instant::now();
    let status = loop {
        if let Ok(Some(s)) = node.try_wait() {
            break Some(s);
        }
        if t0.elapsed() > Duration::from_secs(10) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = node.kill();
    let _ = node.wait();
    let _ = std::fs::remove_dir_all(&model);
    let status = status.expect("copyhold-node still ran 10 s after SIGTERM while loading");
    assert!(
        status.success(),
        "a SIGTERM while loading ends the node cleanly, not by the signal: {status:?}"
    );
}
