//! NVRTC: compiles the kernel programs to CUBIN for one exact architecture
//! (`sm_XY`), through the raw `nvrtcGetCUBIN` (cudarc's safe API returns
//! PTX), with an on-disk cache keyed by source hash, architecture and NVRTC
//! version.
//!
//! `unsafe` here: the NVRTC C API through cudarc's `result`/`sys` layers.
//! Every program handle is created, used and destroyed within one call.
#![allow(unsafe_code)]

use std::ffi::{CString, c_char};
use std::path::{Path, PathBuf};

use cudarc::nvrtc::{result as nv, sys as nvsys};

use super::CudaError;
use super::kernels::{PROGRAMS, Program, program_source};

/// The loaded NVRTC library.
#[derive(Debug, Clone)]
pub struct Nvrtc {
    pub major: i32,
    pub minor: i32,
}

impl Nvrtc {
    /// Loads `libnvrtc` (found through `LD_LIBRARY_PATH` or the linker's
    /// paths); a clear error when it is absent.
    pub fn open() -> Result<Nvrtc, CudaError> {
        let present =
            std::panic::catch_unwind(|| unsafe { nvsys::is_culib_present() }).unwrap_or(false);
        if !present {
            return Err(CudaError::LibraryMissing {
                lib: "libnvrtc",
                hint: "NVRTC 12.x compiles the kernels at start: install it (pip install \
                       nvidia-cuda-nvrtc-cu12) and put the folder holding libnvrtc.so.12 on \
                       LD_LIBRARY_PATH"
                    .into(),
            });
        }
        let (mut major, mut minor) = (0, 0);
        let r = std::panic::catch_unwind(move || {
            let r = unsafe { nvsys::nvrtcVersion(&mut major, &mut minor) };
            (r, major, minor)
        });
        match r {
            Ok((r, major, minor)) => {
                r.result()
                    .map_err(|e| CudaError::Nvrtc(format!("nvrtcVersion: {e}")))?;
                Ok(Nvrtc { major, minor })
            }
            Err(_) => Err(CudaError::Nvrtc(
                "libnvrtc lacks nvrtcVersion (not an NVRTC library?)".into(),
            )),
        }
    }

    pub fn version(&self) -> String {
        format!("{}.{}", self.major, self.minor)
    }

    /// Compiles `source` for `sm_{arch}`; returns the CUBIN and NVRTC's log
    /// (warnings), or the log as the error.
    pub fn compile(
        &self,
        name: &str,
        source: &str,
        arch: u32,
        include_dirs: &[PathBuf],
    ) -> Result<(Vec<u8>, String), CudaError> {
        self.compile_with(name, source, arch, include_dirs, &[])
    }

    /// [`Nvrtc::compile`] with extra NVRTC options (e.g. `--ptxas-options=-v`).
    pub fn compile_with(
        &self,
        name: &str,
        source: &str,
        arch: u32,
        include_dirs: &[PathBuf],
        extra: &[String],
    ) -> Result<(Vec<u8>, String), CudaError> {
        let fail = |log: String| CudaError::CompileFailed {
            program: name.to_string(),
            arch,
            log,
        };
        let src = CString::new(source).map_err(|_| fail("source holds a NUL byte".into()))?;
        let cname =
            CString::new(format!("{name}.cu")).map_err(|_| fail("bad program name".into()))?;
        let prog = nv::create_program(&src, Some(&cname))
            .map_err(|e| CudaError::Nvrtc(format!("nvrtcCreateProgram: {e}")))?;
        let mut opts = compile_options(arch, include_dirs);
        opts.extend_from_slice(extra);
        let compiled = unsafe { nv::compile_program(prog, &opts) };
        let log = unsafe { nv::get_program_log(prog) }
            .map(|v| c_chars_to_string(&v))
            .unwrap_or_default();
        let out = match compiled {
            Err(e) => Err(fail(format!("{e}\n{log}"))),
            Ok(()) => {
                let mut size = 0usize;
                let r = unsafe { nvsys::nvrtcGetCUBINSize(prog, &mut size) }.result();
                match r {
                    Err(e) => Err(fail(format!("nvrtcGetCUBINSize: {e}"))),
                    Ok(()) => {
                        let mut buf = vec![0u8; size];
                        match unsafe { nvsys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut c_char) }
                            .result()
                        {
                            Ok(()) => Ok((buf, log)),
                            Err(e) => Err(fail(format!("nvrtcGetCUBIN: {e}"))),
                        }
                    }
                }
            }
        };
        let _ = unsafe { nv::destroy_program(prog) };
        out
    }
}

fn c_chars_to_string(v: &[c_char]) -> String {
    let bytes: Vec<u8> = v
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).trim().to_string()
}

/// NVRTC options for one architecture.
pub fn compile_options(arch: u32, include_dirs: &[PathBuf]) -> Vec<String> {
    let mut o = vec![
        format!("--gpu-architecture=sm_{arch}"),
        "--std=c++17".to_string(),
        "-DCOPYHOLD_NVRTC=1".to_string(),
    ];
    for d in include_dirs {
        o.push(format!("--include-path={}", d.display()));
    }
    o
}

/// Folders holding `cuda_fp16.h` (NVRTC ships without it): `explicit`
/// first, then `COPYHOLD_CUDA_INCLUDE` (colon-separated), `$CUDA_HOME/include`,
/// `$CUDA_PATH/include`, `/usr/local/cuda/include`, then the pip wheels'
/// header folders next to the library folders (`libs::wheel_include_dirs`).
pub fn include_dirs(explicit: &[PathBuf]) -> Result<Vec<PathBuf>, CudaError> {
    let mut candidates: Vec<PathBuf> = explicit.to_vec();
    if let Some(v) = std::env::var_os("COPYHOLD_CUDA_INCLUDE") {
        candidates.extend(std::env::split_paths(&v));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(v) = std::env::var_os(var) {
            candidates.push(PathBuf::from(v).join("include"));
        }
    }
    candidates.push(PathBuf::from("/usr/local/cuda/include"));
    // pip wheels: next to the libraries (CUDA 12: nvidia/cuda_runtime/include,
    // CUDA 13: nvidia/cu13/include).
    candidates.extend(super::libs::wheel_include_dirs(&super::libs::search_dirs()));
    let found: Vec<PathBuf> = candidates
        .iter()
        .filter(|d| d.join("cuda_fp16.h").is_file())
        .cloned()
        .collect();
    if found.is_empty() {
        return Err(CudaError::HeadersMissing {
            searched: candidates,
        });
    }
    Ok(found)
}

/// FNV-1a, 64 bits: a cache key that is stable across builds and platforms.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in p.iter().chain(&[0xffu8]) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// File name of a cached CUBIN.
pub fn cache_file_name(p: &Program, arch: u32, nvrtc: &Nvrtc, include_dirs: &[PathBuf]) -> String {
    let src = program_source(p);
    let opts = compile_options(arch, include_dirs).join(" ");
    let version = nvrtc.version();
    let key = fnv1a(&[src.as_bytes(), opts.as_bytes(), version.as_bytes()]);
    format!("{}-sm_{arch}-nvrtc{version}-{key:016x}.cubin", p.name)
}

/// Where compiled kernels are kept: `--kernel-cache`, else
/// `$XDG_CACHE_HOME/copyhold/cubin`, else `$HOME/.cache/copyhold/cubin`.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return Some(PathBuf::from(x).join("copyhold/cubin"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/copyhold/cubin"))
}

/// How a program's CUBIN was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Cache,
    Compiled,
}

/// The CUBIN of every program for `arch`, from `cache_dir` when present
/// there, else compiled (and stored; a cache that cannot be written is
/// only a warning).
pub fn build_all(
    nvrtc: &Nvrtc,
    arch: u32,
    include_dirs: &[PathBuf],
    cache_dir: Option<&Path>,
) -> Result<Vec<(Vec<u8>, Source)>, CudaError> {
    let mut out = Vec::new();
    for p in PROGRAMS {
        let file = cache_dir.map(|d| d.join(cache_file_name(p, arch, nvrtc, include_dirs)));
        if let Some(f) = &file
            && let Ok(bytes) = std::fs::read(f)
            && p.entries
                .iter()
                .all(|e| super::kernels::cubin_has_entry(&bytes, e))
        {
            out.push((bytes, Source::Cache));
            continue;
        }
        let (cubin, log) = nvrtc.compile(p.name, &program_source(p), arch, include_dirs)?;
        if !log.is_empty() {
            tracing::debug!(program = p.name, arch, %log, "NVRTC log");
        }
        if let Some(f) = &file {
            store(f, &cubin);
        }
        out.push((cubin, Source::Compiled));
    }
    Ok(out)
}

fn store(file: &Path, bytes: &[u8]) {
    let tmp = file.with_extension(format!("tmp{}", std::process::id()));
    let r = file
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(&tmp, bytes))
        .and_then(|()| std::fs::rename(&tmp, file));
    if let Err(e) = r {
        let _ = std::fs::remove_file(&tmp);
        tracing::warn!(file = %file.display(), error = %e, "cannot write the kernel cache");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(major: i32, minor: i32) -> Nvrtc {
        Nvrtc { major, minor }
    }

    #[test]
    fn the_cache_key_changes_with_source_arch_nvrtc_version_and_includes() {
        let p = PROGRAMS[0];
        let base = cache_file_name(&p, 86, &v(12, 9), &[]);
        assert!(base.starts_with("embedding-sm_86-nvrtc12.9-"), "{base}");
        assert_eq!(base, cache_file_name(&p, 86, &v(12, 9), &[]));
        assert_ne!(base, cache_file_name(&p, 80, &v(12, 9), &[]));
        assert_ne!(base, cache_file_name(&p, 86, &v(12, 8), &[]));
        assert_ne!(
            base,
            cache_file_name(&p, 86, &v(12, 9), &[PathBuf::from("/x")])
        );
        let mut other = p;
        other.source = "// changed\n";
        let changed = cache_file_name(&other, 86, &v(12, 9), &[]);
        assert_ne!(base.rsplit('-').next(), changed.rsplit('-').next());
    }

    #[test]
    fn missing_headers_name_every_folder_searched() {
        let e = include_dirs(&[PathBuf::from("/nonexistent/include")]);
        if let Err(CudaError::HeadersMissing { searched }) = e {
            assert!(searched.contains(&PathBuf::from("/nonexistent/include")));
        }
    }

    #[test]
    fn a_cached_cubin_is_used_only_when_it_exports_every_entry() {
        let dir = std::env::temp_dir().join(format!("cubin-cache-{}", std::process::id()));
        let n = v(12, 9);
        // Store a fake CUBIN for every program, exporting all entries.
        for p in PROGRAMS {
            let mut blob = b"\x7fELF".to_vec();
            for e in p.entries {
                blob.extend_from_slice(e.as_bytes());
                blob.push(0);
            }
            store(&dir.join(cache_file_name(p, 75, &n, &[])), &blob);
        }
        // No NVRTC is needed: every program comes from the cache.
        let got = build_all(&n, 75, &[], Some(&dir)).unwrap();
        assert!(got.iter().all(|(_, s)| *s == Source::Cache));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
