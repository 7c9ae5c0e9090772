//! The model's description, below everything that computes: its config,
//! its stored weights, its tokenizer and streaming detokenizer, and the
//! architectures (one file each) as layers of named tensors. The backends
//! (`crate::cpu`, `crate::cuda`) read these; nothing here runs a forward
//! pass.

pub mod config;
pub mod detok;
pub mod gguf;
pub mod gguf_tokenizer;
pub mod gguf_write;
pub mod layers;
pub mod llama;
pub mod mistral;
pub mod quant;
pub mod qwen2;
pub mod tokenizer;
pub mod weights;

use std::path::Path;

use crate::error::Result;
use crate::model::config::{Arch, ModelConfig};
use crate::model::layers::{DecoderLayer, Linear, RmsNorm};
use crate::model::tokenizer::TextModel;
use crate::model::weights::{Tensor, WeightStore};

/// A loaded decoder: embeddings, blocks, final norm and LM head.
pub struct Decoder {
    pub cfg: ModelConfig,
    pub embed: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// `None` when the head is tied to the embeddings.
    pub lm_head: Option<Linear>,
    /// Rotary inverse frequencies, from the config once.
    pub inv_freq: Vec<f64>,
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
}

/// Loads `config.json` and the weights of a model directory.
pub fn load(dir: &Path) -> Result<Decoder> {
    let cfg = ModelConfig::load(dir)?;
    let store = WeightStore::open(dir)?;
    load_arch(cfg, &store)
}

/// Loads a model and its text side from a Hugging Face directory, a
/// `.gguf` file, or a directory holding one `.gguf` file.
pub fn open(path: &Path) -> Result<(Decoder, TextModel)> {
    if let Some(file) = gguf::find(path) {
        let g = gguf::GgufFile::open(&file)?;
        let cfg = g.config()?;
        let store = g.store(&cfg)?;
        let text = TextModel::from_gguf(&g)?;
        return Ok((load_arch(cfg, &store)?, text));
    }
    let model = load(path)?;
    let text = TextModel::load(path, &model.cfg.eos_token_ids)?;
    Ok((model, text))
}

fn load_arch(cfg: ModelConfig, store: &WeightStore) -> Result<Decoder> {
    match cfg.arch {
        Arch::Llama => llama::load(cfg, store),
        Arch::Mistral => mistral::load(cfg, store),
        Arch::Qwen2 => qwen2::load(cfg, store),
    }
}
