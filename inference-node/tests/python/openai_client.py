"""The node through the official `openai` Python client.

Usage: python3 openai_client.py BASE_URL   (e.g. http://127.0.0.1:8000)
Exits non-zero on the first failed check; prints one line per check.
"""

import sys
import urllib.request

from openai import OpenAI


def metric(base, name):
    body = urllib.request.urlopen(f"{base}/metrics").read().decode()
    for line in body.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def main():
    base = sys.argv[1].rstrip("/")
    client = OpenAI(base_url=f"{base}/v1", api_key="unused")
    model = client.models.list().data[0].id
    print("model", model)
    msgs = [{"role": "user", "content": "Grüße, wörld ✓"}]
    energy = metric(base, "copyhold_node_energy_joules_total")
    used = 0.0

    # Chat, non-streaming and streaming: byte-identical text.
    full = client.chat.completions.create(model=model, messages=msgs, max_tokens=30, seed=11, temperature=1.0)
    used += full.usage.model_extra["energy_joules"]
    text = full.choices[0].message.content
    parts = []
    usage = None
    for chunk in client.chat.completions.create(model=model, messages=msgs, max_tokens=30, seed=11, temperature=1.0,
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                parts.append(c.delta.content)
    assert "".join(parts).encode() == text.encode(), ("chat stream differs", "".join(parts), text)
    assert usage is not None and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    used += usage.model_extra["energy_joules"]
    print("chat stream == non-stream:", repr(text[:30]))

    # Completions, seed reproducibility.
    a = client.completions.create(model=model, prompt="once upon", max_tokens=20, seed=3, temperature=1.0)
    b = client.completions.create(model=model, prompt="once upon", max_tokens=20, seed=3, temperature=1.0)
    assert a.choices[0].text == b.choices[0].text
    used += a.usage.model_extra["energy_joules"] + b.usage.model_extra["energy_joules"]
    print("same seed, same text:", repr(a.choices[0].text[:30]))

    # Stop strings.
    g = client.completions.create(model=model, prompt="the stint", max_tokens=40, temperature=0)
    used += g.usage.model_extra["energy_joules"]
    t = g.choices[0].text
    stop = t[5:7]
    s = client.completions.create(model=model, prompt="the stint", max_tokens=40, temperature=0, stop=[stop])
    used += s.usage.model_extra["energy_joules"]
    assert s.choices[0].text == t[: t.index(stop)] and s.choices[0].finish_reason == "stop"
    print("stop string cuts at", repr(stop))

    # Bad request: max_tokens 0 -> 400 with param.
    try:
        client.completions.create(model=model, prompt="x", max_tokens=0)
        raise AssertionError("max_tokens 0 accepted")
    except Exception as e:  # openai.BadRequestError
        assert getattr(e, "status_code", None) == 400, e
        assert e.body["param"] == "max_tokens", e.body
    print("max_tokens 0 -> 400 param max_tokens")

    delta = metric(base, "copyhold_node_energy_joules_total") - energy
    assert abs(delta - used) <= 1e-6 * max(delta, 1.0), (delta, used)
    print(f"energy: usage sum {used:.6f} J == metrics delta {delta:.6f} J")
    print("ok")


if __name__ == "__main__":
    main()
