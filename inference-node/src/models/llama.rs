//! Llama 2/3 (`LlamaForCausalLM`): optional `attention_bias` on all four
//! attention projections, no sliding window.

use crate::config::ModelConfig;
use crate::error::Result;
use crate::models::Decoder;
use crate::weights::WeightStore;

pub fn load(cfg: ModelConfig, store: &WeightStore) -> Result<Decoder> {
    Decoder::load_common(cfg, store)
}
