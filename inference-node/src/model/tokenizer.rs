//! Text side of a model directory: `tokenizer.json`, the special tokens and
//! chat template of `tokenizer_config.json`, and `generation_config.json`.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result, read_json};
use crate::model::config::token_ids;

/// Defaults a checkpoint ships for sampling (`generation_config.json`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationDefaults {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub repetition_penalty: Option<f32>,
    pub max_new_tokens: Option<usize>,
}

/// Tokenizer plus everything needed to turn chats into token ids.
pub struct TextModel {
    pub tokenizer: tokenizers::Tokenizer,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Every id that ends a generation (config, generation config, eos token).
    pub eos_ids: Vec<u32>,
    pub defaults: GenerationDefaults,
    /// Each token's bytes, read once on the first constrained request.
    token_bytes: std::sync::OnceLock<std::sync::Arc<TokenBytes>>,
}

/// A special token may be a string or `{"content": "..."}`.
fn token_str(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl TextModel {
    /// Loads the tokenizer files of `dir`; `config_eos` are the EOS ids of
    /// `config.json`.
    pub fn load(dir: &Path, config_eos: &[u32]) -> Result<TextModel> {
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.exists() {
            return Err(Error::Tokenizer {
                path: tok_path,
                message: "file not found".into(),
            });
        }
        let tokenizer =
            tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| Error::Tokenizer {
                path: tok_path.clone(),
                message: e.to_string(),
            })?;
        let cfg_path = dir.join("tokenizer_config.json");
        let tcfg: Value = if cfg_path.exists() {
            read_json(&cfg_path)?
        } else {
            Value::Null
        };
        let mut chat_template = match tcfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(Value::Array(a)) => a
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .or(a.first())
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string),
            _ => None,
        };
        let jinja = dir.join("chat_template.jinja");
        if chat_template.is_none() && jinja.exists() {
            chat_template = Some(crate::error::read_to_string(&jinja)?);
        }
        let bos_token = token_str(tcfg.get("bos_token"));
        let eos_token = token_str(tcfg.get("eos_token"));

        let gen_path = dir.join("generation_config.json");
        let gen_cfg: Value = if gen_path.exists() {
            read_json(&gen_path)?
        } else {
            Value::Null
        };
        let mut eos_ids: Vec<u32> = config_eos.to_vec();
        eos_ids.extend(token_ids(&gen_cfg.get("eos_token_id").cloned()));
        if let Some(id) = eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t)) {
            eos_ids.push(id);
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        let f = |k: &str| gen_cfg.get(k).and_then(Value::as_f64);
        let sampling = gen_cfg
            .get("do_sample")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let defaults = GenerationDefaults {
            temperature: if sampling {
                f("temperature").map(|x| x as f32)
            } else {
                Some(0.0)
            },
            top_p: f("top_p").map(|x| x as f32),
            top_k: f("top_k").map(|x| x as usize),
            repetition_penalty: f("repetition_penalty").map(|x| x as f32),
            max_new_tokens: f("max_new_tokens").map(|x| x as usize),
        };
        Ok(TextModel {
            tokenizer,
            chat_template,
            bos_token,
            eos_token,
            eos_ids,
            defaults,
            token_bytes: std::sync::OnceLock::new(),
        })
    }

    /// The text side of a GGUF file, from its `tokenizer.*` metadata.
    pub fn from_gguf(g: &crate::model::gguf::GgufFile) -> Result<TextModel> {
        let bad = |message: String| Error::Tokenizer {
            path: g.path.clone(),
            message,
        };
        let t = crate::model::gguf_tokenizer::from_meta(&g.header.meta).map_err(bad)?;
        let tokenizer: tokenizers::Tokenizer = t
            .tokenizer_json
            .to_string()
            .parse()
            .map_err(|e: tokenizers::Error| bad(e.to_string()))?;
        let mut eos_ids = t.eos_ids;
        eos_ids.sort_unstable();
        eos_ids.dedup();
        Ok(TextModel {
            tokenizer,
            chat_template: t.chat_template,
            bos_token: t.bos_token,
            eos_token: t.eos_token,
            eos_ids,
            defaults: GenerationDefaults::default(),
            token_bytes: std::sync::OnceLock::new(),
        })
    }

    /// Tokenizes a prompt the way HF does for plain text: special tokens
    /// (BOS) added by the post-processor — unless the text already starts
    /// with the BOS token, as rendered chat templates often do.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let add_special = match &self.bos_token {
            Some(b) if !b.is_empty() => !text.starts_with(b.as_str()),
            _ => true,
        };
        self.tokenizer
            .encode(text, add_special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::Tokenizer {
                path: "tokenizer.json".into(),
                message: e.to_string(),
            })
    }

    /// Decodes ids to text, dropping special tokens.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, true).unwrap_or_default()
    }

    /// Every token's bytes (for constrained decoding).
    pub fn token_bytes(&self) -> std::sync::Arc<TokenBytes> {
        self.token_bytes
            .get_or_init(|| std::sync::Arc::new(TokenBytes::new(&self.tokenizer)))
            .clone()
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Text of one token for logprobs (special tokens included).
    pub fn token_text(&self, id: u32) -> String {
        self.tokenizer.decode(&[id], false).unwrap_or_default()
    }
}

/// Each token's bytes, for matching (special tokens have none).
#[derive(Debug)]
pub struct TokenBytes {
    bytes: Vec<Option<Vec<u8>>>,
}

impl TokenBytes {
    /// Reads the vocabulary: byte-level BPE tokens through GPT-2's byte
    /// map, SentencePiece tokens with `▁` as space and `<0xNN>` as a byte.
    pub fn new(tok: &tokenizers::Tokenizer) -> TokenBytes {
        let byte_level = tok
            .get_decoder()
            .and_then(|d| serde_json::to_string(d).ok())
            .is_some_and(|s| s.contains("ByteLevel"));
        let unmap: std::collections::HashMap<char, u8> =
            (0..=255u8).map(|b| (byte_to_char(b), b)).collect();
        let specials: std::collections::HashSet<u32> = tok
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(&id, _)| id)
            .collect();
        let n = tok.get_vocab_size(true);
        let bytes = (0..n as u32)
            .map(|id| {
                if specials.contains(&id) {
                    return None;
                }
                let t = tok.id_to_token(id)?;
                let b: Vec<u8> = if byte_level {
                    t.chars()
                        .map(|c| unmap.get(&c).copied())
                        .collect::<Option<Vec<u8>>>()?
                } else if let Some(h) = t.strip_prefix("<0x").and_then(|h| h.strip_suffix('>')) {
                    vec![u8::from_str_radix(h, 16).ok()?]
                } else {
                    t.replace('\u{2581}', " ").into_bytes()
                };
                (!b.is_empty()).then_some(b)
            })
            .collect();
        TokenBytes { bytes }
    }

    pub fn get(&self, id: u32) -> Option<&[u8]> {
        self.bytes.get(id as usize)?.as_deref()
    }
}

/// GPT-2's reversible byte → printable character map.
pub fn byte_to_char(b: u8) -> char {
    let printable =
        |x: u32| (33..=126).contains(&x) || (161..=172).contains(&x) || (174..=255).contains(&x);
    let b = b as u32;
    if printable(b) {
        return char::from_u32(b).unwrap_or('?');
    }
    let n = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + n).unwrap_or('?')
}
