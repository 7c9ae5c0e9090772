//! Decoder models, one file per architecture, over the shared layers.

pub mod llama;
pub mod mistral;
pub mod qwen2;

use std::path::Path;

use crate::attention::KvStore;
use crate::config::{Arch, ModelConfig};
use crate::error::Result;
use crate::layers::{Batch, DecoderLayer, Linear, RmsNorm, Scratch, rope_rows};
use crate::weights::{Tensor, WeightStore};

/// A loaded decoder: embeddings, blocks, final norm and LM head.
pub struct Decoder {
    pub cfg: ModelConfig,
    pub embed: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// `None` when the head is tied to the embeddings.
    pub lm_head: Option<Linear>,
    inv_freq: Vec<f64>,
}

impl Decoder {
    /// Loads the parts every Llama-family checkpoint has under HF names.
    pub(crate) fn load_common(cfg: ModelConfig, store: &WeightStore) -> Result<Decoder> {
        let embed = store.get(
            "model.embed_tokens.weight",
            &[cfg.vocab_size, cfg.hidden_size],
        )?;
        let layers = (0..cfg.num_layers)
            .map(|i| DecoderLayer::load(store, &cfg, i))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(
            store,
            "model.norm.weight",
            cfg.hidden_size,
            cfg.rms_norm_eps,
        )?;
        // Some tied checkpoints still ship lm_head.weight; honour the flag.
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(Linear::load(
                store,
                "lm_head",
                cfg.vocab_size,
                cfg.hidden_size,
                false,
            )?)
        };
        let inv_freq = cfg.inv_freq();
        Ok(Decoder {
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            inv_freq,
        })
    }

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
            None => crate::matmul::matmul_wt(&hn, n, &self.embed),
        };
        logits
            .chunks_exact(self.cfg.vocab_size)
            .map(<[f32]>::to_vec)
            .collect()
    }
}

/// Loads `config.json` and the weights of a model directory.
pub fn load(dir: &Path) -> Result<Decoder> {
    let cfg = ModelConfig::load(dir)?;
    let store = WeightStore::open(dir)?;
    match cfg.arch {
        Arch::Llama => llama::load(cfg, &store),
        Arch::Mistral => mistral::load(cfg, &store),
        Arch::Qwen2 => qwen2::load(cfg, &store),
    }
}

/// What the engine wants from one logits row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RowWant {
    /// The full row (host-side sampling, logprobs, penalties, golden checks).
    Logits,
    /// The argmax token.
    Greedy,
    /// A token drawn as `sampling::sample` would draw it with these
    /// settings (no penalties) and `uniform` from the sequence's
    /// generator.
    Sample {
        temperature: f32,
        /// 0: no top-k.
        top_k: u32,
        top_p: f32,
        min_p: f32,
        uniform: f64,
    },
}

/// One row's result.
#[derive(Debug, Clone, PartialEq)]
pub enum RowOut {
    Logits(Vec<f32>),
    Token(u32),
}

/// A step that failed on the device. `fatal`: the device is unusable (the
/// process should exit for Kubernetes to restart it); otherwise (out of
/// memory) only this step's requests fail.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct BackendError {
    pub message: String,
    pub fatal: bool,
}

/// Where the math runs. The CPU backend is the oracle; the CUDA backend
/// implements the same trait (and owns its KV storage on the device).
pub trait Backend: Send {
    fn name(&self) -> &'static str;
    fn config(&self) -> &ModelConfig;
    /// Runs one step; K/V for every token is written to the blocks named by
    /// the batch's block tables. Returns the logits of `batch.logits_for`.
    fn forward(&mut self, batch: &Batch) -> Result<Vec<Vec<f32>>, BackendError>;
    /// Whether [`Backend::forward_rows`] can choose tokens itself.
    fn samples_on_device(&self) -> bool {
        false
    }
    /// Like `forward`, but a row may come back as a token chosen on the
    /// device (`wants[i]` for `batch.logits_for[i]`). By default: logits.
    fn forward_rows(
        &mut self,
        batch: &Batch,
        wants: &[RowWant],
    ) -> Result<Vec<RowOut>, BackendError> {
        let _ = wants;
        Ok(self
            .forward(batch)?
            .into_iter()
            .map(RowOut::Logits)
            .collect())
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
        // times per decode step).
        let (model, kv) = (&self.model, &mut self.kv);
        Ok(rayon::scope(|_| model.forward(batch, kv)))
    }
}
