//! Llama 2/3 (`LlamaForCausalLM`): optional `attention_bias` on all four
//! attention projections, no sliding window.

use crate::error::Result;
use crate::model::Decoder;
use crate::model::config::ModelConfig;
use crate::model::weights::WeightStore;

pub fn load(cfg: ModelConfig, store: &WeightStore) -> Result<Decoder> {
    Decoder::load_common(cfg, store)
}
