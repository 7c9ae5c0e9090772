//! Mistral (`MistralForCausalLM`): Llama's weights and math with a sliding
//! attention window on every layer (`sliding_window`, when set).

use crate::error::Result;
use crate::model::Decoder;
use crate::model::config::ModelConfig;
use crate::model::weights::WeightStore;

pub fn load(cfg: ModelConfig, store: &WeightStore) -> Result<Decoder> {
    Decoder::load_common(cfg, store)
}
