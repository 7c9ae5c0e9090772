"""The gateway through the official `openai` Python client, as members call it.

Usage: python3 gateway_client.py BASE_URL API_KEY
Prints one JSON object: the models listed, and for each call its text and the
usage the client saw (None where the client did not ask for it).
"""

import json
import sys

from openai import OpenAI


def main():
    base, key = sys.argv[1].rstrip("/"), sys.argv[2]
    client = OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
    models = [m.id for m in client.models.list().data]
    model = models[0]
    msgs = [{"role": "user", "content": "Grüße aus der Allmende ✓"}]
    out = {"models": models, "calls": []}

    r = client.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0)
    out["calls"].append({"kind": "chat", "text": r.choices[0].message.content,
                         "usage": [r.usage.prompt_tokens, r.usage.completion_tokens]})

    text, usage = "", None
    for c in client.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}):
        if c.choices:
            text += c.choices[0].delta.content or ""
        if c.usage is not None:
            usage = [c.usage.prompt_tokens, c.usage.completion_tokens]
    out["calls"].append({"kind": "chat-stream-usage", "text": text, "usage": usage})

    text, saw_usage = "", False
    for c in client.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0, stream=True):
        if c.choices:
            text += c.choices[0].delta.content or ""
        saw_usage = saw_usage or c.usage is not None
    out["calls"].append({"kind": "chat-stream", "text": text, "usage": None, "saw_usage": saw_usage})

    r = client.completions.create(model=model, prompt="Once upon a time", max_tokens=6, temperature=0)
    out["calls"].append({"kind": "completion", "text": r.choices[0].text,
                         "usage": [r.usage.prompt_tokens, r.usage.completion_tokens]})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
