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
            golden["gguf_size"] = g.stat().st_size
            golden["gguf_fnv1a"] = fnv1a(g)
            golden["synth"] = SYNTH
            golden["llama_cpp"] = "llama-cpp-python 0.3.36 sdist, vendor/llama.cpp, CPU, 2 threads"
            (FIX / f"llamacpp-{qtype}.json").write_text(json.dumps(golden) + "\n")
            print(qtype, "tokens:", golden["tokens"][:16], "...")


if __name__ == "__main__":
    sys.exit(main())
