"""Writes tests/fixtures/gguf/blocks.gguf (one small tensor per block format
copyhold reads) and blocks.golden.json (each tensor dequantized by the
`gguf` Python package, as f32 bit patterns), for tests/gguf.rs.

Run once (output committed):  pip install gguf==0.19.0 numpy
    python3 tests/python/make_gguf_golden.py tests/fixtures/gguf
Q8_0, Q4_0 and BF16 are quantized by the package itself; the package
cannot quantize K-quants, so their blocks are random bytes with finite f16
scales (every such byte string is a valid block), dequantized by it.
"""
import json
import sys
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

K_BLOCK = {T.Q4_K: 144, T.Q5_K: 176, T.Q6_K: 210}


def k_blocks(rng, qtype, n_blocks):
    """Random K-quant blocks whose f16 scales are finite and modest."""
    size = K_BLOCK[qtype]
    b = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    scale_at = [208] if qtype == T.Q6_K else [0, 2]
    for at in scale_at:
        d = (rng.random(n_blocks) * 0.02 + 0.001).astype(np.float16)
        b[:, at:at + 2] = d.view(np.uint8).reshape(n_blocks, 2)
    return b


def main(out: Path):
    rng = np.random.default_rng(22)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "blocks.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    x = (rng.standard_normal((4, 256)) * 0.5).astype(np.float32)
    w.add_tensor("f32", x)
    w.add_tensor("f16", x.astype(np.float16))
    for name, qt in [("bf16", T.BF16), ("q8_0", T.Q8_0), ("q4_0", T.Q4_0)]:
        q = quantize(x, qt)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qt)
    for name, qt in [("q4_k", T.Q4_K), ("q5_k", T.Q5_K), ("q6_k", T.Q6_K)]:
        q = k_blocks(rng, qt, 4).reshape(2, 2 * K_BLOCK[qt])
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    golden = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        y = dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
        golden[t.name] = {
            "type": t.tensor_type.name,
            "shape": [int(d) for d in reversed(t.shape)],
            "bits": y.reshape(-1).view(np.uint32).tolist(),
        }
    (out / "blocks.golden.json").write_text(json.dumps(golden) + "\n")
    print(path, {k: v["type"] for k, v in golden.items()})


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/gguf"))
