"""One streamed chat answer through the official `openai` client, as a member asks.

Usage: python3 stream_chat.py BASE_URL API_KEY MODEL PROMPT
Prints one JSON object: the text, the number of content chunks, and the usage
the stream ended with (including copyhold's `energy_joules`).
"""

import json
import sys

from openai import OpenAI


def main():
    base, key, model, prompt = sys.argv[1].rstrip("/"), sys.argv[2], sys.argv[3], sys.argv[4]
    client = OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
    text, chunks, usage = "", 0, None
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for c in stream:
        if c.choices and c.choices[0].delta.content:
            text += c.choices[0].delta.content
            chunks += 1
        if c.usage is not None:
            usage = c.usage.model_dump()
    print(json.dumps({"text": text, "chunks": chunks, "usage": usage}))


if __name__ == "__main__":
    main()
