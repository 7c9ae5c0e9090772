//! The CPU backend: the oracle the other backends are tested against, and
//! a server in its own right. `layers` runs the model's layers,
//! `attention` holds paged K/V in host memory, `matmul` the SIMD and AMX
//! products, `team` the spinning threads of decode's parallel regions.

pub mod attention;
pub mod layers;
pub mod matmul;
pub mod team;

use crate::cpu::attention::KvStore;
use crate::cpu::layers::{Scratch, rope_rows};
use crate::engine::backend::{Backend, BackendError, Batch};
use crate::model::Decoder;
use crate::model::config::ModelConfig;

impl Decoder {
    /// One forward pass over a batch of tokens from any number of
    /// sequences; returns the logits of `batch.logits_for`, in order.
    pub fn forward(&self, batch: &Batch, kv: &mut KvStore) -> Vec<Vec<f32>> {
        let h = self.cfg.hidden_size;
        let m = batch.tokens.len();
        let mut x = vec![0.0f32; m * h];
        for (i, t) in batch.tokens.iter().enumerate() {
            self.embed
                .read_f32(t.token as usize * h, &mut x[i * h..(i + 1) * h]);
        }
        let positions: Vec<usize> = batch.tokens.iter().map(|t| t.pos).collect();
        let rope = rope_rows(&self.inv_freq, &positions);
        let mut scratch = Scratch::new(&self.cfg, m);
        for (l, layer) in self.layers.iter().enumerate() {
            layer.forward(&self.cfg, l, &mut x, batch, &rope, kv, &mut scratch);
        }
        let mut sel = Vec::with_capacity(batch.logits_for.len() * h);
        for &i in &batch.logits_for {
            sel.extend_from_slice(&x[i * h..(i + 1) * h]);
        }
        let n = batch.logits_for.len();
        let hn = self.norm.forward(&sel);
        let logits = match &self.lm_head {
            Some(head) => head.forward(&hn, n),
            None => crate::cpu::matmul::matmul_wt(&hn, n, &self.embed),
        };
        logits
            .chunks_exact(self.cfg.vocab_size)
            .map(<[f32]>::to_vec)
            .collect()
    }
}

/// The CPU backend: the decoder plus paged K/V in host memory.
pub struct CpuBackend {
    pub model: Decoder,
    pub kv: KvStore,
}

impl CpuBackend {
    pub fn new(model: Decoder, num_blocks: usize, block_size: usize) -> CpuBackend {
        CpuBackend::with_kv(model, num_blocks, block_size, false)
    }

    /// `kv_f16`: keep K/V in f16 (see [`crate::engine::EngineOptions`]).
    pub fn with_kv(
        model: Decoder,
        num_blocks: usize,
        block_size: usize,
        kv_f16: bool,
    ) -> CpuBackend {
        let kv = KvStore::new(&model.cfg, num_blocks, block_size, kv_f16);
        CpuBackend { model, kv }
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }
    fn config(&self) -> &ModelConfig {
        &self.model.cfg
    }
    fn forward(&mut self, batch: &Batch) -> Result<Vec<Vec<f32>>, BackendError> {
        // Run the pass on a pool thread: its parallel regions are then
        // joined by the thread that runs the pass, instead of the engine's
        // thread sleeping and being woken once per region (over a hundred
        // times per decode step). Decode's regions run on the spinning
        // `team` instead.
        let (model, kv) = (&self.model, &mut self.kv);
        Ok(rayon::scope(|_| model.forward(batch, kv)))
    }
}
