//! The engines `copyhold-node bench` is compared with in the same run:
//! llama.cpp (`llama-bench` for its standard single-sequence numbers,
//! `llama-batched-bench` for the batch sizes) on the same weights written as
//! GGUF f16 (`bench/peers/to_gguf.py`), and HF transformers on PyTorch CPU
//! (`bench/peers/hf_bench.py`). Each peer runs as a child process, one
//! process per batch size, so its peak resident memory (polled from
//! `/proc/PID/status`, VmHWM) is that batch's.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use super::BenchResult;

/// One line of the side-by-side table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub engine: String,
    pub batch: usize,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub ttft_mean_s: f64,
    pub ttft_max_s: f64,
    pub peak_rss_mib: f64,
    /// What this row measures when it differs from the others.
    pub note: String,
}

impl Row {
    pub fn from_ours(r: &BenchResult) -> Row {
        Row {
            engine: "copyhold-node".into(),
            batch: r.batch,
            prefill_tokens_per_s: r.prefill_tokens_per_s,
            decode_tokens_per_s: r.decode_tokens_per_s,
            ttft_mean_s: r.ttft_mean_s,
            ttft_max_s: r.ttft_max_s,
            peak_rss_mib: r.peak_rss_mib,
            note: format!("KV {}", r.kv_cache),
        }
    }

    /// Keeps the best of two runs of the same measurement, metric by metric.
    pub fn best(self, o: Row) -> Row {
        Row {
            prefill_tokens_per_s: self.prefill_tokens_per_s.max(o.prefill_tokens_per_s),
            decode_tokens_per_s: self.decode_tokens_per_s.max(o.decode_tokens_per_s),
            ttft_mean_s: self.ttft_mean_s.min(o.ttft_mean_s),
            ttft_max_s: self.ttft_max_s.min(o.ttft_max_s),
            peak_rss_mib: self.peak_rss_mib.min(o.peak_rss_mib),
            ..self
        }
    }
}

/// A child's stdout and its peak resident memory.
struct Ran {
    stdout: String,
    peak_rss_mib: f64,
}

fn vm_hwm_mib(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = s
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<f64>()
        .ok()?;
    Some(kb / 1024.0)
}

/// Runs `cmd`, polling its peak memory; stderr goes to a file that is
/// quoted (its tail) when the command fails.
fn run(mut cmd: Command, what: &str) -> Result<Ran, String> {
    let log = std::env::temp_dir().join(format!(
        "copyhold-bench-{}-{}.log",
        what.replace(|c: char| !c.is_ascii_alphanumeric(), "-"),
        std::process::id()
    ));
    let err = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::from(err))
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("{what}: cannot start: {e}"))?;
    let pid = child.id();
    let mut out = child.stdout.take().expect("piped stdout");
    // Read stdout on a thread so a chatty child never blocks on the pipe.
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let mut peak = 0.0f64;
    let status = loop {
        if let Some(m) = vm_hwm_mib(pid) {
            peak = peak.max(m);
        }
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(format!("{what}: {e}")),
        }
    };
    let stdout = reader.join().unwrap_or_default();
    if !status.success() {
        let tail = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: String = tail
            .lines()
            .rev()
            .take(8)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        return Err(format!(
            "{what}: {status}; stderr ({}):\n{tail}",
            log.display()
        ));
    }
    let _ = std::fs::remove_file(&log);
    Ok(Ran {
        stdout,
        peak_rss_mib: peak,
    })
}

fn json_lines(s: &str) -> impl Iterator<Item = Value> + '_ {
    s.lines()
        .filter(|l| l.trim_start().starts_with('{'))
        .filter_map(|l| serde_json::from_str(l).ok())
}

fn f(v: &Value, key: &str) -> Result<f64, String> {
    v.get(key)
        .and_then(Value::as_f64)
        .ok_or_else(|| format!("no number {key:?} in {v}"))
}

/// `llama-batched-bench`: `batch` sequences of `prompt` random tokens
/// prefilled together, then `generate` decode steps of all of them, which
/// is what `copyhold-node bench` measures.
pub fn llama_batched(
    bin: &Path,
    gguf: &Path,
    batch: usize,
    prompt: usize,
    generate: usize,
    threads: usize,
) -> Result<Row, String> {
    let mut cmd = Command::new(bin);
    cmd.arg("-m").arg(gguf).args([
        "-c",
        &(batch * (prompt + generate)).to_string(),
        "-b",
        "2048",
        "-ub",
        "512",
        "-npp",
        &prompt.to_string(),
        "-ntg",
        &generate.to_string(),
        "-npl",
        &batch.to_string(),
        "-t",
        &threads.to_string(),
        "-tb",
        &threads.to_string(),
        "--output-format",
        "jsonl",
    ]);
    let ran = run(cmd, "llama-batched-bench")?;
    let v = json_lines(&ran.stdout)
        .find(|v| v.get("speed_tg").is_some())
        .ok_or_else(|| format!("llama-batched-bench printed no result: {}", ran.stdout))?;
    let t_pp = f(&v, "t_pp")?;
    Ok(Row {
        engine: "llama.cpp (llama-batched-bench)".into(),
        batch,
        prefill_tokens_per_s: f(&v, "speed_pp")?,
        decode_tokens_per_s: f(&v, "speed_tg")?,
        ttft_mean_s: t_pp,
        ttft_max_s: t_pp,
        peak_rss_mib: ran.peak_rss_mib,
        note: format!("KV f16; decode is {batch}×{generate} tokens over all steps"),
    })
}

/// `llama-bench` (one sequence): `pp{prompt}` and `tg{generate}` from an
/// empty context (its standard numbers), and `tg{generate}` after a
/// `prompt`-token context (`-d`), which is where our decode runs.
pub fn llama_bench(
    bin: &Path,
    gguf: &Path,
    prompt: usize,
    generate: usize,
    threads: usize,
    reps: usize,
) -> Result<Vec<Row>, String> {
    let mut rows = Vec::new();
    for depth in [0, prompt] {
        let mut cmd = Command::new(bin);
        cmd.arg("-m").arg(gguf).args([
            "-p",
            &(if depth == 0 { prompt } else { 0 }).to_string(),
            "-n",
            &generate.to_string(),
            "-d",
            &depth.to_string(),
            "-t",
            &threads.to_string(),
            "-r",
            &reps.max(1).to_string(),
            "-o",
            "jsonl",
        ]);
        let ran = run(cmd, "llama-bench")?;
        let mut pp = None;
        let mut tg = None;
        for v in json_lines(&ran.stdout) {
            let n_prompt = v.get("n_prompt").and_then(Value::as_u64).unwrap_or(0);
            let n_gen = v.get("n_gen").and_then(Value::as_u64).unwrap_or(0);
            let ts = f(&v, "avg_ts")?;
            if n_prompt > 0 && n_gen == 0 {
                pp = Some(ts);
            } else if n_gen > 0 && n_prompt == 0 {
                tg = Some(ts);
            }
        }
        let tg = tg.ok_or_else(|| format!("llama-bench printed no tg result: {}", ran.stdout))?;
        let (prefill, ttft, note) = match pp {
            Some(pp) => (
                pp,
                prompt as f64 / pp,
                format!("pp{prompt} and tg{generate} from an empty context; TTFT = {prompt}/pp"),
            ),
            None => (
                f64::NAN,
                f64::NAN,
                format!("tg{generate} after a {depth}-token context (-d {depth})"),
            ),
        };
        rows.push(Row {
            engine: "llama.cpp (llama-bench)".into(),
            batch: 1,
            prefill_tokens_per_s: prefill,
            decode_tokens_per_s: tg,
            ttft_mean_s: ttft,
            ttft_max_s: ttft,
            peak_rss_mib: ran.peak_rss_mib,
            note,
        });
    }
    Ok(rows)
}

/// `bench/peers/hf_bench.py` under `python` (a venv with torch and
/// transformers): float32 compute over the same safetensors directory.
pub fn transformers(
    python: &Path,
    script: &Path,
    model: &Path,
    batch: usize,
    prompt: usize,
    generate: usize,
    threads: usize,
) -> Result<Row, String> {
    let mut cmd = Command::new(python);
    cmd.arg(script)
        .arg("--model")
        .arg(model)
        .args([
            "--batch",
            &batch.to_string(),
            "--prompt",
            &prompt.to_string(),
            "--gen",
            &generate.to_string(),
            "--threads",
            &threads.to_string(),
        ])
        .env("TOKENIZERS_PARALLELISM", "false")
        .env("HF_HUB_OFFLINE", "1");
    let ran = run(cmd, "transformers")?;
    let v = json_lines(&ran.stdout)
        .find(|v| v.get("decode_tokens_per_s").is_some())
        .ok_or_else(|| format!("hf_bench.py printed no result: {}", ran.stdout))?;
    let torch = v.get("torch").and_then(Value::as_str).unwrap_or("?");
    Ok(Row {
        engine: "transformers (PyTorch CPU)".into(),
        batch,
        prefill_tokens_per_s: f(&v, "prefill_tokens_per_s")?,
        decode_tokens_per_s: f(&v, "decode_tokens_per_s")?,
        ttft_mean_s: f(&v, "ttft_mean_s")?,
        ttft_max_s: f(&v, "ttft_max_s")?,
        peak_rss_mib: ran.peak_rss_mib,
        note: format!("float32 compute, torch {torch}"),
    })
}

/// Where `hf_bench.py` is by default: beside this crate in the repository.
pub fn default_hf_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/peers/hf_bench.py")
}

/// The side-by-side table in Markdown.
pub fn table(rows: &[Row]) -> String {
    let num = |v: f64, d: usize| {
        if v.is_finite() {
            format!("{v:.d$}")
        } else {
            "–".into()
        }
    };
    let mut s = String::from(
        "| engine | batch | prefill tok/s | decode tok/s | TTFT mean s | TTFT max s | peak RSS MiB | note |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.engine,
            r.batch,
            num(r.prefill_tokens_per_s, 1),
            num(r.decode_tokens_per_s, 2),
            num(r.ttft_mean_s, 2),
            num(r.ttft_max_s, 2),
            num(r.peak_rss_mib, 0),
            r.note
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_keeps_the_best_of_each_metric() {
        let a = Row {
            engine: "e".into(),
            batch: 1,
            prefill_tokens_per_s: 10.0,
            decode_tokens_per_s: 2.0,
            ttft_mean_s: 3.0,
            ttft_max_s: 3.0,
            peak_rss_mib: 100.0,
            note: String::new(),
        };
        let b = Row {
            prefill_tokens_per_s: 9.0,
            decode_tokens_per_s: 3.0,
            ttft_mean_s: 2.5,
            ttft_max_s: 4.0,
            peak_rss_mib: 90.0,
            ..a.clone()
        };
        let c = a.best(b);
        assert_eq!(c.prefill_tokens_per_s, 10.0);
        assert_eq!(c.decode_tokens_per_s, 3.0);
        assert_eq!(c.ttft_mean_s, 2.5);
        assert_eq!(c.ttft_max_s, 3.0);
        assert_eq!(c.peak_rss_mib, 90.0);
        assert!(table(&[c]).contains("| e | 1 | 10.0 | 3.00 |"));
    }

    #[test]
    fn a_missing_peer_binary_is_an_error_not_a_panic() {
        let e = llama_batched(
            Path::new("/nonexistent/llama-batched-bench"),
            Path::new("x.gguf"),
            1,
            8,
            2,
            1,
        )
        .unwrap_err();
        assert!(e.contains("cannot start"), "{e}");
    }
}
