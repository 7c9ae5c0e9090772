"""llama.cpp's logits on the GGUF fidelity fixtures, saved as golden files
(tests/fixtures/gguf/llamacpp-<type>.json) so tests/gguf.rs compares
copyhold-node with llama.cpp without building it.

The fixture model is synthesized and converted by copyhold-node itself
(`synth` then `gguf --type q8_0|q4_k_m`; both are deterministic); the golden
file records the GGUF's size and FNV-1a hash, which the test checks before
comparing. Needs llama.cpp's static libraries (see ../shared/PEERS.md):
    LLAMA=.../vendor/llama.cpp NODE=target/debug/copyhold-node \
        python3 tests/python/make_llamacpp_golden.py
"""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIX = HERE.parent / "fixtures" / "gguf"
# Must match `fidelity_spec` in tests/gguf.rs.
SYNTH = ["--arch", "llama", "--hidden", "256", "--layers", "2", "--heads", "4",
         "--kv-heads", "2", "--intermediate", "512", "--vocab", "320",
         "--dtype", "f32", "--seed", "22", "--max-position-embeddings", "1024"]
PROMPT = [0, 7, 42, 100, 261, 280, 5, 300, 17, 64, 128, 200, 33, 250, 99, 310]
GEN, KEEP = 256, 48


def fnv1a(path):
    h = 0xCBF29CE484222325
    for b in Path(path).read_bytes():
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def build(llama: Path, out: Path):
    libs = sorted(str(p) for p in (llama / "build").rglob("*.a"))
    cmd = ["g++", "-O2", "-std=c++17", str(HERE.parent / "llamacpp" / "logits.cpp"),
           "-I", str(llama / "include"), "-I", str(llama / "ggml" / "include"),
           "-o", str(out), "-Wl,--start-group", *libs, "-Wl,--end-group",
           "-lpthread", "-fopenmp", "-ldl"]
    subprocess.run(cmd, check=True)


def batched_top1(exe: Path, gguf: Path, golden) -> int:
    """How many of llama.cpp's own greedy tokens its batched pass over the
    whole sequence (prompt and generated tokens in one batch) also puts
    first: llama.cpp agrees with itself only this often on this model,
    whose top two logits are often within 0.2 % of the range."""
    seq = golden["prompt"] + golden["tokens"][:-1]
    res = subprocess.run([str(exe), str(gguf), "1", str(len(seq)), *map(str, seq)],
                         check=True, capture_output=True, text=True)
    rows = json.loads(res.stdout)["logits"]
    p = len(golden["prompt"]) - 1
    return sum(1 for k, t in enumerate(golden["tokens"])
               if max(range(len(rows[p + k])), key=rows[p + k].__getitem__) == t)


def main():
    llama = Path(os.environ["LLAMA"])
    node = os.environ.get("NODE", "target/debug/copyhold-node")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        exe = tmp / "logits"
        build(llama, exe)
        subprocess.run([node, "synth", *SYNTH, "--out", str(tmp / "hf")], check=True,
                       stdout=subprocess.DEVNULL)
        for qtype in ["q8_0", "q4_k_m"]:
            g = tmp / f"{qtype}.gguf"
            subprocess.run([node, "gguf", "--from", str(tmp / "hf"), "--out", str(g),
                            "--type", qtype], check=True, stdout=subprocess.DEVNULL)
            res = subprocess.run([str(exe), str(g), str(GEN), str(KEEP),
                                  *map(str, PROMPT)], check=True, capture_output=True, text=True)
            golden = json.loads(res.stdout)
            golden["batched_top1"] = batched_top1(exe, g, golden)
            golden["gguf_size"] = g.stat().st_size
            golden["gguf_fnv1a"] = fnv1a(g)
            golden["synth"] = SYNTH
            golden["llama_cpp"] = "llama-cpp-python 0.3.36 sdist, vendor/llama.cpp, CPU, 2 threads"
            (FIX / f"llamacpp-{qtype}.json").write_text(json.dumps(golden) + "\n")
            print(qtype, "tokens:", golden["tokens"][:16], "...")

        fixture_prompts(exe)


def fixture_prompts(exe: Path):
    """llama.cpp's greedy continuations of the fixtures' prompts (the cases
    and the chat of tests/fixtures/tiny-llama/golden.json, as many tokens as
    transformers generated there) on the Q8_0 GGUF of that fixture model."""
    root = HERE.parents[2] / "tests" / "fixtures"
    gguf = root / "tiny-llama-gguf" / "model-q8_0.gguf"
    ref = json.loads((root / "tiny-llama" / "golden.json").read_text())
    prompts = [c["token_ids"] for c in ref["cases"]] + [ref["chat"]["token_ids"]]
    counts = [len(c["greedy_continuation_ids"]) for c in ref["cases"]]
    counts.append(len(ref["chat"]["greedy_continuation_ids"]))
    cases = []
    for ids, n in zip(prompts, counts):
        res = subprocess.run([str(exe), str(gguf), str(n), str(len(ids)), *map(str, ids)],
                             check=True, capture_output=True, text=True)
        out = json.loads(res.stdout)
        cases.append({"prompt": ids, "tokens": out["tokens"], "last_logits": out["logits"][-1]})
    golden = {"gguf": "tests/fixtures/tiny-llama-gguf/model-q8_0.gguf",
              "gguf_fnv1a": fnv1a(gguf), "cases": cases,
              "llama_cpp": "llama-cpp-python 0.3.36 sdist, vendor/llama.cpp, CPU, 2 threads"}
    (FIX / "llamacpp-fixture-q8_0.json").write_text(json.dumps(golden) + "\n")
    print("fixture q8_0:", [c["tokens"][:4] for c in cases])


if __name__ == "__main__":
    sys.exit(main())
