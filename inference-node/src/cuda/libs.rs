//! Finding the CUDA user-space libraries and headers, and the GPUs in use.
//!
//! cudarc (CUDA 12 bindings) dlopens `libnvrtc.so`, `libnvrtc.so.12`, … by
//! name, never `.so.13`, and only through the loader's paths. CUDA 13
//! installs (and its pip wheels, `nvidia/cu13/lib`) ship `libnvrtc.so.13`
//! and `libcublas.so.13`. [`prepare_process`] finds the versioned files
//! (`.so.12` first: CUDA 13's NVRTC no longer targets sm_60…sm_70), gives
//! them the unversioned names in a private folder and re-executes the node
//! once with that folder on `LD_LIBRARY_PATH` (the loader reads it only at
//! start). [`wheel_include_dirs`] finds `cuda_fp16.h` next to the wheels'
//! libraries: `nvidia/cuda_runtime/include` (CUDA 12) and
//! `nvidia/cu13/include` (CUDA 13).
//!
//! NVML numbers every GPU of the machine; [`nvml_selection`] keeps only the
//! GPUs this process's CUDA sees (`CUDA_VISIBLE_DEVICES`), matched by UUID.
//!
//! `unsafe` here: cudarc's probe for the driver library.
#![allow(unsafe_code)]

use std::path::{Path, PathBuf};

/// Libraries cudarc loads by their unversioned name.
pub const LIBS: [&str; 2] = ["nvrtc", "cublas"];

/// Versions tried, most preferred first.
pub const VERSIONS: [&str; 2] = ["12", "13"];

/// Set in the re-executed process, so it never re-executes again.
pub const LINKED_ENV: &str = "COPYHOLD_CUDA_LIBS_LINKED";

/// Folders searched for libraries: `LD_LIBRARY_PATH`, `$CUDA_HOME/lib64`,
/// the usual system folders, and the pip wheels' folders of the running
/// virtual environment.
pub fn search_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("LD_LIBRARY_PATH")
        .map(|v| std::env::split_paths(&v).collect())
        .unwrap_or_default();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(v) = std::env::var_os(var) {
            dirs.push(PathBuf::from(v).join("lib64"));
        }
    }
    dirs.extend(
        [
            "/usr/local/cuda/lib64",
            "/usr/lib/x86_64-linux-gnu",
            "/usr/lib64",
        ]
        .map(PathBuf::from),
    );
    if let Some(venv) = std::env::var_os("VIRTUAL_ENV") {
        dirs.extend(wheel_lib_dirs(Path::new(&venv)));
    }
    dirs
}

/// `lib/python*/site-packages/nvidia/{cu13,cuda_nvrtc,cublas}/lib` of a venv.
fn wheel_lib_dirs(venv: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(venv.join("lib")) else {
        return out;
    };
    for e in entries.flatten() {
        let nvidia = e.path().join("site-packages/nvidia");
        for sub in ["cu13", "cuda_nvrtc", "cublas"] {
            out.push(nvidia.join(sub).join("lib"));
        }
    }
    out
}

/// The file of `lib` (e.g. "nvrtc") to load: the first of `libX.so.12`,
/// `libX.so.13` found in `dirs` (in order within each version).
pub fn find_versioned(dirs: &[PathBuf], lib: &str) -> Option<PathBuf> {
    VERSIONS.iter().find_map(|v| {
        dirs.iter()
            .map(|d| d.join(format!("lib{lib}.so.{v}")))
            .find(|p| p.is_file())
    })
}

/// True if a file cudarc would load for `lib` is on `dirs` already.
pub fn unversioned_present(dirs: &[PathBuf], lib: &str) -> bool {
    dirs.iter().any(|d| {
        ["".to_string(), ".12".to_string()]
            .iter()
            .any(|suffix| d.join(format!("lib{lib}.so{suffix}")).is_file())
    })
}

/// Links `link_dir/libX.so` to each found library that cudarc would not
/// find by itself; returns the libraries linked.
pub fn link_missing(dirs: &[PathBuf], link_dir: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    let mut linked = Vec::new();
    for lib in LIBS {
        if unversioned_present(dirs, lib) {
            continue;
        }
        let Some(target) = find_versioned(dirs, lib) else {
            continue;
        };
        std::fs::create_dir_all(link_dir)?;
        let link = link_dir.join(format!("lib{lib}.so"));
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&target, &link)?;
        linked.push((lib.to_string(), target));
    }
    Ok(linked)
}

/// Whether a command line uses CUDA (`--device cuda`, `cuda-check`).
pub fn wants_cuda(args: impl Iterator<Item = String>) -> bool {
    let args: Vec<String> = args.collect();
    args.iter()
        .any(|a| a == "cuda-check" || a == "--device=cuda")
        || args
            .windows(2)
            .any(|w| w[0] == "--device" && w[1] == "cuda")
}

/// For `--device cuda`: when NVRTC or cuBLAS exist only under names cudarc
/// does not try, links them under `cache/culibs` and re-executes this
/// process with that folder first on `LD_LIBRARY_PATH`. Returns only when
/// nothing needs doing (or re-executing failed: then loading reports the
/// missing library as before).
pub fn prepare_process(cache: &Path) {
    if std::env::var_os(LINKED_ENV).is_some() {
        return;
    }
    let dirs = search_dirs();
    let link_dir = cache.join("culibs");
    let linked = match link_missing(&dirs, &link_dir) {
        Ok(l) if !l.is_empty() => l,
        _ => return,
    };
    for (lib, target) in &linked {
        tracing::info!(lib, target = %target.display(), "CUDA library under its versioned name only: linked");
    }
    let mut path = vec![link_dir];
    path.extend(
        linked
            .iter()
            .filter_map(|(_, t)| t.parent().map(Path::to_path_buf)),
    );
    path.extend(
        std::env::var_os("LD_LIBRARY_PATH")
            .map(|v| std::env::split_paths(&v).collect::<Vec<_>>())
            .unwrap_or_default(),
    );
    let Ok(joined) = std::env::join_paths(path) else {
        return;
    };
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("LD_LIBRARY_PATH", joined)
        .env(LINKED_ENV, "1")
        .exec();
    tracing::warn!(error = %err, "re-executing with the CUDA libraries linked failed");
}

/// Header folders of the pip wheels whose libraries are in `lib_dirs`:
/// `nvidia/cu13/lib` → `nvidia/cu13/include`; `nvidia/cuda_nvrtc/lib` →
/// `nvidia/cuda_runtime/include` (CUDA 12 ships the headers in the
/// runtime wheel).
pub fn wheel_include_dirs(lib_dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for d in lib_dirs {
        let Some(pkg) = d.parent() else { continue };
        out.push(pkg.join("include"));
        if let Some(nvidia) = pkg.parent() {
            out.push(nvidia.join("cuda_runtime/include"));
            out.push(nvidia.join("cu13/include"));
        }
    }
    out.dedup();
    out
}

/// NVML indices of the GPUs in use. `visible` is `CUDA_VISIBLE_DEVICES`;
/// `nvml_uuids[i]` the UUID of NVML device i; `cuda_uuids` the UUIDs of the
/// devices CUDA enumerates (when the driver could be asked: exact). Without
/// them, UUID entries (or unique prefixes, as CUDA accepts) select by UUID
/// and integer entries by NVML index (CUDA's order equals NVML's with
/// `CUDA_DEVICE_ORDER=PCI_BUS_ID`). As CUDA does, the list ends at the
/// first entry that names no device; MIG instances are skipped.
pub fn nvml_selection(
    visible: Option<&str>,
    nvml_uuids: &[String],
    cuda_uuids: Option<&[String]>,
) -> Vec<u32> {
    let by_uuid = |u: &str| nvml_uuids.iter().position(|n| n.eq_ignore_ascii_case(u));
    if let Some(cuda) = cuda_uuids {
        return cuda
            .iter()
            .filter_map(|u| by_uuid(u).map(|i| i as u32))
            .collect();
    }
    let Some(visible) = visible else {
        return (0..nvml_uuids.len() as u32).collect();
    };
    let mut out = Vec::new();
    for entry in visible.split(',').map(str::trim) {
        if entry.is_empty() {
            break;
        }
        if entry.starts_with("MIG-") {
            continue;
        }
        let found = if let Ok(i) = entry.parse::<usize>() {
            (i < nvml_uuids.len()).then_some(i)
        } else {
            let prefix = entry.to_ascii_lowercase();
            let hits: Vec<usize> = nvml_uuids
                .iter()
                .enumerate()
                .filter(|(_, u)| u.to_ascii_lowercase().starts_with(&prefix))
                .map(|(i, _)| i)
                .collect();
            (hits.len() == 1).then(|| hits[0])
        };
        match found {
            Some(i) if !out.contains(&(i as u32)) => out.push(i as u32),
            Some(_) => {}
            None => break,
        }
    }
    out
}

/// UUIDs of the devices the CUDA driver enumerates (it applies
/// `CUDA_VISIBLE_DEVICES`); `None` without a usable driver.
pub fn cuda_device_uuids() -> Option<Vec<String>> {
    use cudarc::driver::{result, sys};
    // SAFETY: probing for the library only reads the loader's paths.
    let present = std::panic::catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false);
    if !present {
        return None;
    }
    std::panic::catch_unwind(|| {
        result::init().ok()?;
        let n = result::device::get_count().ok()?;
        (0..n)
            .map(|i| {
                let dev = result::device::get(i).ok()?;
                let u = result::device::get_uuid(dev).ok()?;
                Some(uuid_string(&u.bytes.map(|b| b as u8)))
            })
            .collect()
    })
    .ok()
    .flatten()
}

/// NVML's spelling of a CUDA device UUID: `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
pub fn uuid_string(bytes: &[u8; 16]) -> String {
    let h: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..16].concat()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"").unwrap();
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("copyhold-libs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn cuda_13_wheels_libraries_are_linked_under_the_names_cudarc_loads() {
        let root = tmp("cu13");
        let lib = root.join("site-packages/nvidia/cu13/lib");
        touch(&lib.join("libnvrtc.so.13"));
        touch(&lib.join("libcublas.so.13"));
        touch(&root.join("site-packages/nvidia/cu13/include/cuda_fp16.h"));
        let dirs = vec![lib.clone()];
        let links = root.join("links");
        let linked = link_missing(&dirs, &links).unwrap();
        let names: Vec<&str> = linked.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(names, ["nvrtc", "cublas"]);
        assert_eq!(
            std::fs::read_link(links.join("libnvrtc.so")).unwrap(),
            lib.join("libnvrtc.so.13")
        );
        let inc = wheel_include_dirs(&dirs);
        assert!(
            inc.iter().any(|d| d.join("cuda_fp16.h").is_file()),
            "{inc:?}"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn version_12_is_preferred_and_a_loadable_library_is_left_alone() {
        let root = tmp("cu12");
        let a = root.join("a");
        let b = root.join("b");
        touch(&a.join("libnvrtc.so.13"));
        touch(&b.join("libnvrtc.so.12.9.86"));
        touch(&b.join("libnvrtc.so.12"));
        let dirs = vec![a.clone(), b.clone()];
        assert_eq!(
            find_versioned(&dirs, "nvrtc"),
            Some(b.join("libnvrtc.so.12"))
        );
        // cudarc finds libnvrtc.so.12 itself: nothing to link.
        assert!(link_missing(&dirs, &root.join("links")).unwrap().is_empty());
        // The CUDA 12 wheel layout: headers in the runtime wheel.
        let cu12 = root.join("nvidia/cuda_nvrtc/lib");
        touch(&root.join("nvidia/cuda_runtime/include/cuda_fp16.h"));
        let inc = wheel_include_dirs(&[cu12]);
        assert!(
            inc.iter().any(|d| d.join("cuda_fp16.h").is_file()),
            "{inc:?}"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn nvml_reads_only_the_gpus_cuda_sees_matched_by_uuid() {
        let nvml: Vec<String> = (0..4)
            .map(|i| format!("GPU-{i}{i}{i}{i}aaaa-0000-0000-0000-00000000000{i}"))
            .collect();
        // The driver's own list (its order, not NVML's) wins.
        let cuda = vec![nvml[3].clone(), nvml[1].clone()];
        assert_eq!(nvml_selection(Some("3,1"), &nvml, Some(&cuda)), vec![3, 1]);
        // Without the driver: UUIDs (and unique prefixes), indices, MIG skipped.
        assert_eq!(nvml_selection(Some("GPU-2222,0"), &nvml, None), vec![2, 0]);
        assert_eq!(nvml_selection(Some("MIG-x,1"), &nvml, None), vec![1]);
        // CUDA stops at the first entry naming no device.
        assert_eq!(nvml_selection(Some("1,9,2"), &nvml, None), vec![1]);
        assert_eq!(nvml_selection(Some(""), &nvml, None), Vec::<u32>::new());
        assert_eq!(nvml_selection(None, &nvml, None), vec![0, 1, 2, 3]);
        let mut b = [0u8; 16];
        b[0] = 0xab;
        b[15] = 0x01;
        assert_eq!(uuid_string(&b), "GPU-ab000000-0000-0000-0000-000000000001");
    }
}
