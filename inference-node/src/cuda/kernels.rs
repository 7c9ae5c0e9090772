//! The kernel programs: `.cu` files under `inference-node/kernels/`,
//! embedded in the binary, each compiled by NVRTC as one program with
//! `common.cuh` prepended.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction};
use cudarc::nvrtc::Ptx;

use super::CudaError;

/// Helpers every program starts with.
pub const COMMON: &str = include_str!("../../kernels/common.cuh");

/// One NVRTC program and the entry points it must export.
#[derive(Debug, Clone, Copy)]
pub struct Program {
    pub name: &'static str,
    pub source: &'static str,
    pub entries: &'static [&'static str],
}

/// Every program the backend loads (and `cuda-check` compiles).
pub const PROGRAMS: &[Program] = &[
    Program {
        name: "embedding",
        source: include_str!("../../kernels/embedding.cu"),
        entries: &["embedding_f32", "embedding_f16", "embedding_bf16"],
    },
    Program {
        name: "norm",
        source: include_str!("../../kernels/norm.cu"),
        entries: &["add_rmsnorm"],
    },
    Program {
        name: "rope",
        source: include_str!("../../kernels/rope.cu"),
        entries: &["rope_table", "rope_apply"],
    },
    Program {
        name: "elementwise",
        source: include_str!("../../kernels/elementwise.cu"),
        entries: &[
            "silu_mul",
            "add_inplace",
            "gather_rows",
            "cast_f32_f16",
            "cast_f32_bf16",
            "add_bias",
        ],
    },
    Program {
        name: "gemv",
        source: include_str!("../../kernels/gemv.cu"),
        entries: &[
            "gemv_f32",
            "gemv_f16",
            "gemv_bf16",
            "gemv3_f32",
            "gemv3_f16",
            "gemv3_bf16",
            "gemv_q8",
            "gemv_q8_0",
            "gemv3_q8_0",
            "dequant_q8_0_f16",
        ],
    },
    Program {
        name: "gemv_blocks",
        source: include_str!("../../kernels/gemv_blocks.cu"),
        entries: &[
            "gemv_q4_0",
            "gemv3_q4_0",
            "dequant_q4_0_f16",
            "gemv_q4_k",
            "gemv3_q4_k",
            "dequant_q4_k_f16",
            "gemv_q5_k",
            "gemv3_q5_k",
            "dequant_q5_k_f16",
            "gemv_q6_k",
            "gemv3_q6_k",
            "dequant_q6_k_f16",
        ],
    },
    Program {
        name: "attention",
        source: include_str!("../../kernels/attention.cu"),
        entries: &[
            "kv_write_f32",
            "kv_write_f16",
            "attention_decode_f32",
            "attention_decode_f16",
            "attention_reduce",
            "attention_prefill_f32",
            "attention_prefill_f16",
        ],
    },
    Program {
        name: "sampling",
        source: include_str!("../../kernels/sampling.cu"),
        entries: &["argmax_rows", "sample_rows"],
    },
];

/// Threads per block the backend launches `entry` with (the register
/// check in `cuda-check` needs it).
pub fn launch_block(entry: &str) -> u32 {
    match entry {
        "argmax_rows" | "sample_rows" => 1024,
        e if e.starts_with("attention_") => 128,
        _ => 256,
    }
}

/// The full text NVRTC compiles for `p`.
pub fn program_source(p: &Program) -> String {
    format!("{COMMON}\n#line 1 \"{}.cu\"\n{}", p.name, p.source)
}

/// True if a CUBIN exports `entry` (its symbol table holds the name).
pub fn cubin_has_entry(cubin: &[u8], entry: &str) -> bool {
    let mut pat = entry.as_bytes().to_vec();
    pat.push(0);
    cubin.windows(pat.len()).any(|w| w == pat.as_slice())
}

/// Kernels loaded into one device context, by entry name.
pub struct Kernels {
    funcs: HashMap<&'static str, CudaFunction>,
}

impl Kernels {
    /// Loads every program's CUBIN (`cubins[i]` for `PROGRAMS[i]`).
    pub fn load(ctx: &Arc<CudaContext>, cubins: Vec<Vec<u8>>) -> Result<Kernels, CudaError> {
        let mut funcs = HashMap::new();
        for (p, cubin) in PROGRAMS.iter().zip(cubins) {
            let module = ctx
                .load_module(Ptx::from_binary(cubin))
                .map_err(|e| CudaError::driver(format!("loading the {} kernels", p.name), e))?;
            for &entry in p.entries {
                let f = module
                    .load_function(entry)
                    .map_err(|e| CudaError::driver(format!("finding kernel {entry}"), e))?;
                funcs.insert(entry, f);
            }
        }
        Ok(Kernels { funcs })
    }

    pub fn get(&self, name: &'static str) -> Result<&CudaFunction, CudaError> {
        self.funcs
            .get(name)
            .ok_or_else(|| CudaError::Unsupported(format!("kernel {name} is not loaded")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_entry_is_defined_extern_c_in_its_program() {
        for p in PROGRAMS {
            let src = program_source(p);
            for e in p.entries {
                let direct = src.contains(&format!("extern \"C\" __global__ void {e}("));
                // Instantiated by a macro: `NAME_##SUFFIX` plus the suffix list.
                let (stem, suffix) = e.rsplit_once('_').unwrap_or((e, ""));
                let by_macro = src.contains(&format!("void {stem}_##SUFFIX("))
                    && (src.contains(&format!("_INSTANTIATE({suffix},"))
                        || src.contains(&format!("_ENTRY({suffix},")));
                assert!(direct || by_macro, "{}: {e} not found", p.name);
            }
        }
    }

    #[test]
    fn architecture_guards_surround_dp4a_and_bf16_intrinsics() {
        let c = COMMON;
        let dp4a = c.find("__dp4a(").unwrap();
        assert!(c[..dp4a].rfind("#if __CUDA_ARCH__ >= 610").is_some());
        for intrinsic in ["__bfloat1622float2(", "__float2bfloat16_rn("] {
            let at = c.find(intrinsic).unwrap();
            let guard = c[..at].rfind("#if __CUDA_ARCH__ >= 800").unwrap();
            assert!(
                c[guard..at].find("#endif").is_none(),
                "{intrinsic} unguarded"
            );
        }
    }

    #[test]
    fn cubin_entry_lookup_needs_the_whole_name() {
        let blob = b"\x7fELF....gemv_f16\0gemv_f32x\0";
        assert!(cubin_has_entry(blob, "gemv_f16"));
        assert!(!cubin_has_entry(blob, "gemv_f32"));
    }
}
