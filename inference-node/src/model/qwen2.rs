//! Qwen2 (`Qwen2ForCausalLM`): bias on q/k/v (not o), sliding window only
//! when `use_sliding_window` and only from `max_window_layers` up; usually
//! tied embeddings on small sizes. The config module sets those flags; the
//! weights are the shared layers under HF names.

use crate::error::Result;
use crate::model::Decoder;
use crate::model::config::ModelConfig;
use crate::model::weights::WeightStore;

pub fn load(cfg: ModelConfig, store: &WeightStore) -> Result<Decoder> {
    debug_assert!(cfg.qkv_bias && !cfg.o_bias);
    Decoder::load_common(cfg, store)
}
