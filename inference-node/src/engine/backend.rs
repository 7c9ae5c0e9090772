//! What the engine asks of a backend, and the one trait every backend
//! (the CPU one and the GPU one) implements. Nothing here names a device:
//! `crate::load` picks the backend once, and the engine only holds a
//! `Box<dyn Backend>`.

use crate::model::config::ModelConfig;

/// One token of a batch: which sequence it belongs to and where.
#[derive(Debug, Clone)]
pub struct BatchToken {
    pub token: u32,
    pub pos: usize,
    /// Index into `Batch::block_tables`.
    pub seq: usize,
    /// Computed on the wide prefill kernels (AMX, where the CPU has it): a
    /// prompt token of a sequence whose prompt is long enough to repay
    /// their packing (see `engine::WIDE_MIN_PROMPT`). Generated tokens and
    /// short prompts take the FMA kernels. The choice follows the sequence
    /// and the token, never the batch, so a sequence computes the same bits
    /// alone or batched.
    pub wide: bool,
}

/// What one engine step hands a backend.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub tokens: Vec<BatchToken>,
    pub block_tables: Vec<Vec<u32>>,
    /// Indices into `tokens` whose logits are wanted, in order.
    pub logits_for: Vec<usize>,
}

impl Batch {
    /// Maximal runs of consecutive `wide` tokens (row ranges).
    pub fn wide_runs(&self) -> Vec<std::ops::Range<usize>> {
        let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
        for (i, t) in self.tokens.iter().enumerate() {
            if !t.wide {
                continue;
            }
            match runs.last_mut() {
                Some(r) if r.end == i => r.end = i + 1,
                _ => runs.push(i..i + 1),
            }
        }
        runs
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
