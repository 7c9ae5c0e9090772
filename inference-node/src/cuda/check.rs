//! `cuda-check`: compiles every kernel program for every target
//! architecture with NVRTC (no GPU needed) and reports a kernel ×
//! architecture table. Each cell also checks that the CUBIN exports every
//! entry point the backend loads.

use std::path::PathBuf;

use super::CudaError;
use super::kernels::{PROGRAMS, cubin_has_entry, launch_block, program_source};
use super::nvrtc::Nvrtc;

/// Pascal (P100, P40) to Hopper.
pub const ARCHS: &[u32] = &[60, 61, 70, 75, 80, 86, 89, 90];

/// One compiled cell.
#[derive(Debug)]
pub struct Cell {
    pub arch: u32,
    /// CUBIN size in bytes, or the failure.
    pub result: Result<usize, String>,
    /// ptxas's per-entry resource lines (registers, shared memory, spills).
    pub resources: Vec<Usage>,
}

/// What ptxas reported for one entry point.
#[derive(Debug, Clone, PartialEq)]
pub struct Usage {
    pub entry: String,
    pub registers: u32,
    pub spill_bytes: u32,
    pub line: String,
}

/// Registers per multiprocessor on every architecture from sm_60 to sm_90:
/// a block needing more cannot launch.
pub const REGISTER_FILE: u32 = 65536;

/// Parses `--ptxas-options=-v` output.
pub fn parse_ptxas(log: &str) -> Vec<Usage> {
    let mut out: Vec<Usage> = Vec::new();
    let mut entry = String::new();
    let mut spill = 0;
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            entry = rest.split('\'').next().unwrap_or("").to_string();
            spill = 0;
        }
        if line.contains("bytes spill stores") {
            // "N bytes stack frame, N bytes spill stores, N bytes spill loads":
            // a stack frame alone (local arrays) is not a spill.
            let words: Vec<&str> = line.split_whitespace().collect();
            spill = words
                .windows(3)
                .filter(|w| w[1] == "bytes" && w[2] == "spill")
                .filter_map(|w| w[0].parse::<u32>().ok())
                .sum();
        }
        if let Some(rest) = line.split("Used ").nth(1)
            && let Some(n) = rest.split_whitespace().next().and_then(|n| n.parse().ok())
        {
            out.push(Usage {
                entry: entry.clone(),
                registers: n,
                spill_bytes: spill,
                line: line
                    .split("info    :")
                    .last()
                    .unwrap_or(line)
                    .trim()
                    .to_string(),
            });
        }
    }
    out
}

/// A cell's resource problems: blocks that cannot launch, or spills.
fn resource_problems(usages: &[Usage]) -> Option<String> {
    let bad: Vec<String> = usages
        .iter()
        .filter_map(|u| {
            let block = launch_block(&u.entry);
            if u.registers * block > REGISTER_FILE {
                Some(format!(
                    "{}: {} registers x {block} threads exceed the register file ({REGISTER_FILE})",
                    u.entry, u.registers
                ))
            } else if u.spill_bytes > 0 {
                Some(format!("{}: spills registers ({})", u.entry, u.line))
            } else {
                None
            }
        })
        .collect();
    (!bad.is_empty()).then(|| bad.join("\n"))
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

    /// Every entry's registers and shared memory per architecture.
    pub fn resources(&self) -> String {
        let mut s = String::new();
        for (name, cells) in &self.rows {
            for c in cells {
                for u in &c.resources {
                    s += &format!("{name} sm_{} {}: {}\n", c.arch, u.entry, u.line);
                }
            }
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
                let verbose = ["--ptxas-options=-v".to_string()];
                let mut resources = Vec::new();
                let result = match nvrtc.compile_with(p.name, &src, arch, &includes, &verbose) {
                    Ok((cubin, log)) => {
                        resources = parse_ptxas(&log);
                        match p.entries.iter().find(|e| !cubin_has_entry(&cubin, e)) {
                            Some(e) => Err(format!("the CUBIN does not export {e}")),
                            None => match resource_problems(&resources) {
                                Some(problem) => Err(problem),
                                None => Ok(cubin.len()),
                            },
                        }
                    }
                    Err(CudaError::CompileFailed { log, .. }) => Err(log),
                    Err(e) => Err(e.to_string()),
                };
                Cell {
                    arch,
                    result,
                    resources,
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'sample_rows' for 'sm_60'
ptxas info    : Function properties for sample_rows
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 46 registers, used 1 barriers, 664 bytes smem, 376 bytes cmem[0]
ptxas info    : Compiling entry function 'gemv_f16' for 'sm_60'
ptxas info    : Function properties for gemv_f16
    16 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 64 registers, used 0 barriers, 364 bytes cmem[0]";

    #[test]
    fn ptxas_lines_are_parsed_per_entry() {
        let u = parse_ptxas(LOG);
        assert_eq!(u.len(), 2);
        assert_eq!(
            (u[0].entry.as_str(), u[0].registers, u[0].spill_bytes),
            ("sample_rows", 46, 0)
        );
        assert_eq!(
            (u[1].entry.as_str(), u[1].registers, u[1].spill_bytes),
            ("gemv_f16", 64, 16)
        );
    }

    #[test]
    fn spills_and_blocks_too_big_for_the_register_file_fail_the_cell() {
        let u = parse_ptxas(LOG);
        assert!(resource_problems(&u[..1]).is_none());
        assert!(resource_problems(&u[1..]).unwrap().contains("spills"));
        let mut big = u[0].clone();
        big.registers = 72; // 72 x 1024 threads > 65536
        assert!(resource_problems(&[big]).unwrap().contains("register file"));
    }
}
