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
