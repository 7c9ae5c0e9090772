//! Mistral (`MistralForCausalLM`): Llama's weights and math with a sliding
//! attention window on every layer (`sliding_window`, when set).

use crate::config::ModelConfig;
use crate::error::Result;
use crate::models::Decoder;
use crate::weights::WeightStore;

pub fn load(cfg: ModelConfig, store: &WeightStore) -> Result<Decoder> {
    Decoder::load_common(cfg, store)
}
