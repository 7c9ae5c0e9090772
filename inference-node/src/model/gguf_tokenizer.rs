//! The tokenizer stored in a GGUF header (`tokenizer.ggml.*`) as the
//! `tokenizer.json` Hugging Face would ship for the same vocabulary, so the
//! one `tokenizers` code path serves both kinds of model:
//! - `gpt2`: byte-level BPE with its merges and pre-tokenizer regex;
//! - `llama`: SentencePiece BPE with byte fallback, its merges derived from
//!   the piece scores as transformers' `LlamaConverter` does.

use std::collections::HashMap;

use serde_json::{Value, json};

use crate::model::gguf::Meta;

/// GGUF token types.
const NORMAL: i64 = 1;
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// Llama 3's pre-tokenizer split (also Qwen2's, which splits digits alone).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// What the text side needs from a GGUF header.
pub struct GgufText {
    pub tokenizer_json: Value,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub eos_ids: Vec<u32>,
}

fn strings(meta: &HashMap<String, Meta>, key: &str) -> Vec<String> {
    meta.get(key)
        .and_then(Meta::as_array)
        .map(|a| {
            a.iter()
                .map(|m| m.as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Builds the tokenizer description; the error names what is missing.
pub fn from_meta(meta: &HashMap<String, Meta>) -> Result<GgufText, String> {
    let model = meta
        .get("tokenizer.ggml.model")
        .and_then(Meta::as_str)
        .ok_or("tokenizer.ggml.model is missing")?;
    let tokens = strings(meta, "tokenizer.ggml.tokens");
    if tokens.is_empty() {
        return Err("tokenizer.ggml.tokens is missing or empty".into());
    }
    let types: Vec<i64> = meta
        .get("tokenizer.ggml.token_type")
        .and_then(Meta::as_array)
        .map(|a| a.iter().map(|m| m.as_f64().unwrap_or(1.0) as i64).collect())
        .unwrap_or_else(|| vec![NORMAL; tokens.len()]);
    let id = |k: &str| meta.get(k).and_then(Meta::as_u64).map(|v| v as u32);
    let bos = id("tokenizer.ggml.bos_token_id");
    let eos = id("tokenizer.ggml.eos_token_id");
    let flag = |k: &str| match meta.get(k) {
        Some(Meta::Bool(b)) => Some(*b),
        _ => None,
    };
    let name = |i: Option<u32>| i.and_then(|i| tokens.get(i as usize).cloned());
    let add_bos = flag("tokenizer.ggml.add_bos_token").unwrap_or(model == "llama") && bos.is_some();
    let added: Vec<Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(&CONTROL) | Some(&USER_DEFINED)))
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": types.get(i) == Some(&CONTROL)})
        })
        .collect();
    let post = match (add_bos, name(bos)) {
        (true, Some(b)) => json!({"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": b, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {b.clone(): {"id": b, "ids": [bos], "tokens": [b]}}}),
        _ => Value::Null,
    };
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let mut tj = match model {
        "gpt2" => gpt2(meta, vocab)?,
        "llama" => spm(
            meta,
            &tokens,
            &types,
            vocab,
            id("tokenizer.ggml.unknown_token_id"),
        )?,
        other => {
            return Err(format!(
                "tokenizer model {other:?} (supported: gpt2, llama)"
            ));
        }
    };
    tj["added_tokens"] = json!(added);
    tj["post_processor"] = post;
    let mut eos_ids: Vec<u32> = eos.into_iter().collect();
    eos_ids.extend(id("tokenizer.ggml.eot_token_id"));
    Ok(GgufText {
        tokenizer_json: tj,
        chat_template: meta
            .get("tokenizer.chat_template")
            .and_then(Meta::as_str)
            .map(str::to_string),
        bos_token: name(bos),
        eos_token: name(eos),
        eos_ids,
    })
}

fn gpt2(
    meta: &HashMap<String, Meta>,
    vocab: serde_json::Map<String, Value>,
) -> Result<Value, String> {
    let merges: Vec<Value> = strings(meta, "tokenizer.ggml.merges")
        .iter()
        .map(|m| match m.split_once(' ') {
            Some((a, b)) => Ok(json!([a, b])),
            None => Err(format!("merge {m:?} is not two tokens")),
        })
        .collect::<Result<_, _>>()?;
    let pre = meta
        .get("tokenizer.ggml.pre")
        .and_then(Meta::as_str)
        .unwrap_or("default");
    let byte_level = |regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": regex});
    let split = |re: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
            byte_level(false)]})
    };
    let pre_tokenizer = match pre {
        "default" | "gpt-2" | "gpt2" => byte_level(true),
        "llama3" | "llama-bpe" | "smaug-bpe" => split(LLAMA3_SPLIT),
        "qwen2" => split(QWEN2_SPLIT),
        other => {
            return Err(format!(
                "BPE pre-tokenizer {other:?} (supported: default, llama-bpe, qwen2)"
            ));
        }
    };
    Ok(json!({
        "version": "1.0", "truncation": null, "padding": null, "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges}
    }))
}

/// SentencePiece BPE: merges are every split of a normal piece into two
/// pieces, the piece with the higher score merging first.
fn spm(
    meta: &HashMap<String, Meta>,
    tokens: &[String],
    types: &[i64],
    vocab: serde_json::Map<String, Value>,
    unk: Option<u32>,
) -> Result<Value, String> {
    let scores: Vec<f64> = meta
        .get("tokenizer.ggml.scores")
        .and_then(Meta::as_array)
        .map(|a| a.iter().map(|m| m.as_f64().unwrap_or(0.0)).collect())
        .ok_or("tokenizer.ggml.scores is missing (needed for a llama tokenizer)")?;
    let normal: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| types.get(*i).is_none_or(|&t| t == NORMAL))
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(f64, usize, usize, usize)> = Vec::new();
    for (&piece, &id) in &normal {
        for (at, _) in piece.char_indices().skip(1) {
            let (a, b) = piece.split_at(at);
            if let (Some(&ia), Some(&ib)) = (normal.get(a), normal.get(b)) {
                merges.push((scores.get(id).copied().unwrap_or(0.0), id, ia, ib));
            }
        }
    }
    merges.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
    let merges: Vec<Value> = merges
        .iter()
        .map(|&(_, _, a, b)| json!([tokens[a], tokens[b]]))
        .collect();
    let unk_token = unk.and_then(|u| tokens.get(u as usize).cloned());
    let add_prefix = !matches!(
        meta.get("tokenizer.ggml.add_space_prefix"),
        Some(Meta::Bool(false))
    );
    let mut norm =
        vec![json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"})];
    let mut decoder = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_prefix {
        norm.insert(0, json!({"type": "Prepend", "prepend": "\u{2581}"}));
        decoder.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    Ok(json!({
        "version": "1.0", "truncation": null, "padding": null,
        "normalizer": {"type": "Sequence", "normalizers": norm},
        "pre_tokenizer": null,
        "decoder": {"type": "Sequence", "decoders": decoder},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk_token, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab, "merges": merges}
    }))
}
