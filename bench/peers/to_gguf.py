#!/usr/bin/env python3
"""Write a Llama-architecture HF model directory (safetensors, f16/bf16/f32)
as a GGUF file llama.cpp loads, so `llama-bench` runs on the very weights
`copyhold-node bench` and the transformers script run on.

    python to_gguf.py MODEL_DIR OUT.gguf

Needs `numpy`, `safetensors` and `gguf` (0.19). Only what llama.cpp's own
`convert_hf_to_gguf.py` does for `LlamaForCausalLM` is done here, without
torch and without a real tokenizer:

- 2-D weights keep their dtype (f16 stays f16; bf16 is written as f16 too,
  since llama-bench's f16 numbers are the ones compared); 1-D norms are f32.
- q_proj / k_proj rows are permuted from HF's rotate-half layout back to
  the interleaved layout llama.cpp's LLAMA rope expects (`permute` in
  convert_hf_to_gguf's llama conversion).
- The vocabulary is a stand-in SentencePiece-style list of `vocab_size`
  tokens (control tokens, the 256 byte tokens, then `<t_N>`): llama-bench
  feeds random token ids and never detokenizes, but the file must carry a
  vocabulary to load.
"""

import json
import sys
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    rows = w.shape[0]
    return (
        w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def load_tensors(d: Path) -> dict:
    index = d / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    out = {}
    for f in files:
        out.update(load_file(str(d / f)))
    return out


def main() -> None:
    src, dst = Path(sys.argv[1]), sys.argv[2]
    cfg = json.loads((src / "config.json").read_text())
    arch = cfg.get("architectures", ["LlamaForCausalLM"])[0]
    if arch not in ("LlamaForCausalLM", "MistralForCausalLM"):
        sys.exit(f"{arch}: only Llama-architecture models are converted")
    h, n_layer = cfg["hidden_size"], cfg["num_hidden_layers"]
    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads", n_head)
    head_dim = cfg.get("head_dim") or h // n_head
    vocab = cfg["vocab_size"]

    w = gguf.GGUFWriter(dst, "llama")
    w.add_name(src.name)
    w.add_context_length(cfg.get("max_position_embeddings", 4096))
    w.add_embedding_length(h)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-5))
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    # Stand-in SentencePiece vocabulary.
    special = ["<s>", "</s>", "<unk>"]
    tokens = special + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"<t_{i}>" for i in range(len(tokens), vocab)]
    tokens = tokens[:vocab]
    types = [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.BYTE] * 256
    types += [gguf.TokenType.NORMAL] * (vocab - len(types))
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * vocab)
    w.add_token_types(types[:vocab])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_unk_token_id(2)
    w.add_add_bos_token(False)

    t = load_tensors(src)

    def mat(name: str) -> np.ndarray:
        a = t[name]
        return a if a.dtype == np.float16 else a.astype(np.float16)

    def vec(name: str) -> np.ndarray:
        return t[name].astype(np.float32)

    w.add_tensor("token_embd.weight", mat("model.embed_tokens.weight"))
    for i in range(n_layer):
        p = f"model.layers.{i}"
        w.add_tensor(f"blk.{i}.attn_norm.weight", vec(f"{p}.input_layernorm.weight"))
        w.add_tensor(f"blk.{i}.attn_q.weight", permute(mat(f"{p}.self_attn.q_proj.weight"), n_head))
        w.add_tensor(f"blk.{i}.attn_k.weight", permute(mat(f"{p}.self_attn.k_proj.weight"), n_kv))
        w.add_tensor(f"blk.{i}.attn_v.weight", mat(f"{p}.self_attn.v_proj.weight"))
        w.add_tensor(f"blk.{i}.attn_output.weight", mat(f"{p}.self_attn.o_proj.weight"))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", vec(f"{p}.post_attention_layernorm.weight"))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", mat(f"{p}.mlp.gate_proj.weight"))
        w.add_tensor(f"blk.{i}.ffn_up.weight", mat(f"{p}.mlp.up_proj.weight"))
        w.add_tensor(f"blk.{i}.ffn_down.weight", mat(f"{p}.mlp.down_proj.weight"))
    w.add_tensor("output_norm.weight", vec("model.norm.weight"))
    if not cfg.get("tie_word_embeddings", False):
        w.add_tensor("output.weight", mat("lm_head.weight"))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(dst)


if __name__ == "__main__":
    main()
