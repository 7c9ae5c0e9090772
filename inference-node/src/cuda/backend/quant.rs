//! GGUF block weights on the device (Q8_0, Q4_0, Q4_K, Q5_K, Q6_K): they
//! stay in the blocks the file stores, so a Q4_K_M 8B model takes its file
//! size on the GPU rather than 16 GB of f16. Decode runs the kernels that
//! compute on the blocks (`kernels/gemv.cu` for Q8_0, `gemv_blocks.cu` for
//! the others); a prefill GEMM first dequantizes the weight to f16 into one
//! scratch buffer, then runs cuBLAS. The buffer holds at most
//! [`DEQUANT_CHUNK_ELEMS`] values: a larger matrix (an 8B model's LM head,
//! 525 M values) is dequantized and multiplied a chunk of rows at a time,
//! so the buffer costs 128 MiB rather than 2 GiB (what the head would take
//! at the power-of-two capacity [`super::Reuse`] allocates).

use super::Decoder;
use crate::model::quant::QType;
use crate::model::weights::DType;

/// The kernels of one block format.
#[derive(Debug, Clone, Copy)]
pub(super) struct BlockKernels {
    /// `gemv_*(const float* x, const unsigned char* w, const float* bias, float* y, int m, int n, int k)`
    pub gemv: &'static str,
    /// `gemv3_*`: up to three projections of the same activations.
    pub gemv3: &'static str,
    /// `dequant_*_f16(const unsigned char* w, h16* y, size_t n)`
    pub dequant: &'static str,
}

/// The kernels that compute on `q` blocks.
pub(super) fn block_kernels(q: QType) -> BlockKernels {
    let (gemv, gemv3, dequant) = match q {
        QType::Q8_0 => ("gemv_q8_0", "gemv3_q8_0", "dequant_q8_0_f16"),
        QType::Q4_0 => ("gemv_q4_0", "gemv3_q4_0", "dequant_q4_0_f16"),
        QType::Q4K => ("gemv_q4_k", "gemv3_q4_k", "dequant_q4_k_f16"),
        QType::Q5K => ("gemv_q5_k", "gemv3_q5_k", "dequant_q5_k_f16"),
        QType::Q6K => ("gemv_q6_k", "gemv3_q6_k", "dequant_q6_k_f16"),
    };
    BlockKernels {
        gemv,
        gemv3,
        dequant,
    }
}

/// Most values the prefill dequantization buffer holds (64 Mi: 128 MiB of
/// f16). The operator's sizing counts the same (operator/src/serving/sizing.rs).
pub(super) const DEQUANT_CHUNK_ELEMS: usize = 1 << 26;

/// Rows of an `n × k` block weight dequantized per GEMM: all of them when
/// they fit [`DEQUANT_CHUNK_ELEMS`], else as many as fit (at least one).
pub(super) fn chunk_rows(n: usize, k: usize) -> usize {
    (DEQUANT_CHUNK_ELEMS / k.max(1)).clamp(1, n.max(1))
}

/// Bytes of the f16 buffer a prefill GEMM dequantizes block weights into:
/// the largest chunk of a block linear of the model at the capacity
/// [`super::Reuse`] rounds it up to (0 without block linears).
pub(super) fn dequant_bytes(model: &Decoder) -> u64 {
    let layers = model
        .layers
        .iter()
        .flat_map(|l| [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down]);
    layers
        .chain(model.lm_head.as_ref())
        .filter(|l| matches!(l.w.dtype, DType::Q(_)))
        .map(|l| {
            let (n, k) = (l.w.shape[0], l.w.shape[1]);
            2 * crate::cuda::scratch::capacity_for(chunk_rows(n, k) * k) as u64
        })
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_8b_models_head_is_dequantized_in_chunks_of_at_most_64_mi_values() {
        // Llama 3 8B: the head (128 256 × 4096) in 8 chunks of 16 384 rows;
        // an FFN matrix (14 336 × 4096, 58.7 M values) in one.
        assert_eq!(chunk_rows(128_256, 4096), 16_384);
        assert_eq!(128_256usize.div_ceil(chunk_rows(128_256, 4096)), 8);
        assert_eq!(chunk_rows(14_336, 4096), 14_336);
        assert!(chunk_rows(14_336, 4096) * 4096 <= DEQUANT_CHUNK_ELEMS);
        // Rows wider than a chunk still go one at a time.
        assert_eq!(chunk_rows(3, DEQUANT_CHUNK_ELEMS * 2), 1);
        assert_eq!(
            crate::cuda::scratch::capacity_for(chunk_rows(128_256, 4096) * 4096),
            DEQUANT_CHUNK_ELEMS
        );
    }

    #[test]
    fn every_block_format_names_kernels_the_gemv_programs_export() {
        let entries: Vec<&str> = crate::cuda::kernels::PROGRAMS
            .iter()
            .flat_map(|p| p.entries.iter().copied())
            .collect();
        for q in [QType::Q8_0, QType::Q4_0, QType::Q4K, QType::Q5K, QType::Q6K] {
            let k = block_kernels(q);
            for name in [k.gemv, k.gemv3, k.dequant] {
                assert!(entries.contains(&name), "{q:?}: {name}");
            }
        }
    }
}
