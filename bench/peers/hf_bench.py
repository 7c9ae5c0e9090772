#!/usr/bin/env python3
"""HF transformers on PyTorch CPU, measured the way `copyhold-node bench`
measures itself: `batch` sequences of `prompt` random tokens are prefilled
in one forward pass, then decoded greedily for `gen - 1` more steps with the
KV cache, all sequences together.

    python hf_bench.py --model DIR --batch 1,8 --prompt 512 --gen 128 --threads 2

Prints one JSON line per batch size with the same fields as
`copyhold-node bench`: prefill_tokens_per_s (batch*prompt over the prefill
time), decode_tokens_per_s (batch*(gen-1) over the decode time),
ttft_mean_s / ttft_max_s (every sequence gets its first token when the one
prefill pass ends, so both are the prefill time) and peak_rss_mib (the
process's peak resident memory so far: the model's weights plus the largest
batch run until then, so run one batch size per process for a per-batch
peak). Compute is float32, as copyhold's CPU engine computes (f16 weights
widened to f32).
"""

import argparse
import json
import resource
import time

import torch
from transformers import AutoModelForCausalLM


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", default="1")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype)
    model.eval()
    load_s = time.perf_counter() - t0
    vocab = model.config.vocab_size

    for b in [int(x) for x in a.batch.split(",") if x]:
        g = torch.Generator().manual_seed(b)
        ids = torch.randint(0, vocab, (b, a.prompt), generator=g)
        with torch.inference_mode():
            t = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
            prefill_s = time.perf_counter() - t
            cache = out.past_key_values
            t = time.perf_counter()
            for _ in range(a.gen - 1):
                out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
            decode_s = time.perf_counter() - t
        print(
            json.dumps(
                {
                    "device": "cpu",
                    "batch": b,
                    "prompt": a.prompt,
                    "generate": a.gen,
                    "threads": torch.get_num_threads(),
                    "dtype": a.dtype,
                    "prefill_tokens_per_s": b * a.prompt / prefill_s,
                    "decode_tokens_per_s": b * (a.gen - 1) / max(decode_s, 1e-9),
                    "ttft_mean_s": prefill_s,
                    "ttft_max_s": prefill_s,
                    "peak_rss_mib": peak_rss_mib(),
                    "load_s": load_s,
                    "torch": torch.__version__,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
