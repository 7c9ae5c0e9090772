//! `cuda-check`: compiles every kernel program for every target
//! architecture with NVRTC (no GPU needed) and reports a kernel ×
//! architecture table. Each cell also checks that the CUBIN exports every
//! entry point the backend loads.

use std::path::PathBuf;

use super::CudaError;
use super::kernels::{PROGRAMS, cubin_has_entry, program_source};
use super::nvrtc::Nvrtc;

/// Pascal (P100, P40) to Hopper.
pub const ARCHS: &[u32] = &[60, 61, 70, 75, 80, 86, 89, 90];

/// One compiled cell.
#[derive(Debug)]
pub struct Cell {
    pub arch: u32,
    /// CUBIN size in bytes, or the failure.
    pub result: Result<usize, String>,
}

/// The whole table.
#[derive(Debug)]
pub struct Report {
    pub nvrtc: String,
    pub archs: Vec<u32>,
    pub rows: Vec<(String, Vec<Cell>)>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.rows
            .iter()
            .all(|(_, cells)| cells.iter().all(|c| c.result.is_ok()))
    }

    /// The table as text: one row per program, `ok (NN KiB)` or `FAIL`.
    pub fn table(&self) -> String {
        let w0 = self
            .rows
            .iter()
            .map(|(n, _)| n.len())
            .max()
            .unwrap_or(6)
            .max(6);
        let mut s = format!("{:<w0$}", "kernel");
        for a in &self.archs {
            s += &format!(" | {:>11}", format!("sm_{a}"));
        }
        s.push('\n');
        s += &"-".repeat(w0);
        for _ in &self.archs {
            s += "-|------------";
        }
        s.push('\n');
        for (name, cells) in &self.rows {
            s += &format!("{name:<w0$}");
            for c in cells {
                let cell = match &c.result {
                    Ok(n) => format!("ok {:>4} KiB", n.div_ceil(1024)),
                    Err(_) => "FAIL".to_string(),
                };
                s += &format!(" | {cell:>11}");
            }
            s.push('\n');
        }
        s
    }

    /// The logs of failed cells.
    pub fn failures(&self) -> String {
        let mut s = String::new();
        for (name, cells) in &self.rows {
            for c in cells {
                if let Err(e) = &c.result {
                    s += &format!("--- {name} sm_{}:\n{e}\n", c.arch);
                }
            }
        }
        s
    }
}

/// Compiles everything; `Err` only when NVRTC or the headers are missing.
pub fn run(archs: &[u32], explicit_includes: &[PathBuf]) -> Result<Report, CudaError> {
    let nvrtc = Nvrtc::open()?;
    let includes = super::nvrtc::include_dirs(explicit_includes)?;
    let mut rows = Vec::new();
    for p in PROGRAMS {
        let src = program_source(p);
        let cells = archs
            .iter()
            .map(|&arch| {
                let result = match nvrtc.compile(p.name, &src, arch, &includes) {
                    Ok((cubin, _log)) => {
                        match p.entries.iter().find(|e| !cubin_has_entry(&cubin, e)) {
                            None => Ok(cubin.len()),
                            Some(e) => Err(format!("the CUBIN does not export {e}")),
                        }
                    }
                    Err(CudaError::CompileFailed { log, .. }) => Err(log),
                    Err(e) => Err(e.to_string()),
                };
                Cell { arch, result }
            })
            .collect();
        rows.push((format!("{} ({})", p.name, p.entries.len()), cells));
    }
    Ok(Report {
        nvrtc: nvrtc.version(),
        archs: archs.to_vec(),
        rows,
    })
}
