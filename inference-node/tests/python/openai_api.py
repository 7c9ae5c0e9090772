"""Issue 20's API through the official `openai` Python client, against a
node serving a random-weights model: tool calls (a round trip, streamed and
not), structured output that parses and validates, logprobs, n > 1, seeds,
stop as a string and a list, and OpenAI-shaped errors.

Usage: python3 openai_api.py BASE_URL
Exits non-zero on the first failed check; prints one line per check.
"""

import json
import sys

import jsonschema
import openai
from openai import OpenAI

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}


def tool_round_trip(client, model, stream, choice):
    msgs = [{"role": "user", "content": "What is the weather in Oslo?"}]
    args = dict(model=model, messages=msgs, tools=[WEATHER, CLOCK], tool_choice=choice,
                max_tokens=60, temperature=1.0, seed=4)
    if stream:
        calls = {}
        finish = None
        for chunk in client.chat.completions.create(stream=True, **args):
            for c in chunk.choices:
                for d in c.delta.tool_calls or []:
                    cur = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                    cur["id"] = d.id or cur["id"]
                    if d.function and d.function.name:
                        cur["name"] += d.function.name
                    if d.function and d.function.arguments:
                        cur["arguments"] += d.function.arguments
                finish = c.finish_reason or finish
        calls = [calls[k] for k in sorted(calls)]
    else:
        r = client.chat.completions.create(**args)
        finish = r.choices[0].finish_reason
        calls = [{"id": t.id, "name": t.function.name, "arguments": t.function.arguments}
                 for t in r.choices[0].message.tool_calls or []]
    assert finish == "tool_calls", (finish, calls)
    assert calls, "no tool calls"
    for c in calls:
        assert c["id"], c
        params = {"get_weather": WEATHER, "now": CLOCK}[c["name"]]["function"]["parameters"]
        jsonschema.validate(json.loads(c["arguments"]), params)
    # Send the results back: an assistant message with the calls, a tool
    # message for each; the model answers in text.
    msgs.append({"role": "assistant", "content": None, "tool_calls": [
        {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
        for c in calls]})
    for c in calls:
        msgs.append({"role": "tool", "tool_call_id": c["id"], "content": "Sunny, 21 degrees"})
    r2 = client.chat.completions.create(model=model, messages=msgs, tools=[WEATHER, CLOCK], tool_choice="none",
                                        max_tokens=8)
    assert r2.choices[0].message.tool_calls is None
    assert r2.choices[0].message.content is not None
    # The tool results are in the prompt.
    bare = client.chat.completions.create(model=model, messages=msgs[:1], max_tokens=1)
    assert r2.usage.prompt_tokens > bare.usage.prompt_tokens + 8, (r2.usage, bare.usage)
    return calls


def main():
    base = sys.argv[1].rstrip("/")
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id

    # Tool calls, forced (required and a named function), streamed and not.
    for stream in (False, True):
        calls = tool_round_trip(client, model, stream, "required")
        print(f"tool round trip (required, stream={stream}):", [(c["name"], c["arguments"]) for c in calls])
        named = {"type": "function", "function": {"name": "get_weather"}}
        calls = tool_round_trip(client, model, stream, named)
        assert [c["name"] for c in calls] == ["get_weather"]
        print(f"tool round trip (named, stream={stream}):", calls[0]["arguments"])

    # tool_choice auto: the random model writes text, not a call; streamed
    # (held while tools are offered, then sent) it equals the plain answer.
    args = dict(model=model, messages=[{"role": "user", "content": "hi"}], tools=[WEATHER], max_tokens=12,
                seed=3, temperature=1.0)
    plain = client.chat.completions.create(**args)
    parts = []
    for chunk in client.chat.completions.create(stream=True, **args):
        for c in chunk.choices:
            assert not c.delta.tool_calls
            parts.append(c.delta.content or "")
    assert plain.choices[0].message.tool_calls is None
    assert "".join(parts) == plain.choices[0].message.content, (parts, plain)
    print("tool_choice auto, text answer, streamed == plain:", repr(plain.choices[0].message.content))

    # Structured output: json_schema (strict) and json_object, several seeds.
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
            "address": {"type": "object", "properties": {"zip": {"type": "string"}, "ok": {"type": "boolean"}},
                        "required": ["zip", "ok"], "additionalProperties": False},
            "score": {"type": ["number", "null"]},
        },
        "required": ["name", "age", "tags", "address", "score"],
        "additionalProperties": False,
    }
    for seed in range(4):
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Describe a person."}], max_tokens=80, seed=seed,
            temperature=1.0,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema,
                                                                    "strict": True}})
        doc = json.loads(r.choices[0].message.content)
        jsonschema.validate(doc, schema)
    print("json_schema output validates:", r.choices[0].message.content)
    parts = []
    for chunk in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "JSON please"}], max_tokens=40, seed=9,
            response_format={"type": "json_object"}, stream=True):
        for c in chunk.choices:
            parts.append(c.delta.content or "")
    doc = json.loads("".join(parts))
    assert isinstance(doc, dict)
    print("json_object (streamed) parses:", "".join(parts))
    # Too few tokens for the schema's shortest document: a 400, not a cut document.
    try:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "x"}], max_tokens=5,
            response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}})
        raise AssertionError("max_tokens too small for the schema was accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "max_tokens", e.body
    print("max_tokens below the schema's shortest document -> 400 max_tokens")

    # Logprobs, chat and completions.
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                       logprobs=True, top_logprobs=3, temperature=0)
    lp = r.choices[0].logprobs.content
    assert len(lp) == r.usage.completion_tokens, (len(lp), r.usage)
    for t in lp:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob
        assert abs(t.logprob - t.top_logprobs[0].logprob) < 1e-4  # greedy: the best
    print("chat logprobs:", [(t.token, round(t.logprob, 3)) for t in lp])
    r = client.completions.create(model=model, prompt="once upon", max_tokens=4, logprobs=2, temperature=0)
    c = r.choices[0].logprobs
    assert len(c.tokens) == 4 and len(c.token_logprobs) == 4 and all(len(t) == 2 for t in c.top_logprobs)
    print("completion logprobs:", list(zip(c.tokens, [round(x, 3) for x in c.token_logprobs])))

    # n = 2, under a seed: two different choices, the same again.
    a = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=12,
                                       n=2, seed=5, temperature=1.0)
    b = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=12,
                                       n=2, seed=5, temperature=1.0)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.choices[0].message.content != a.choices[1].message.content
    print("n=2:", [c.message.content[:20] for c in a.choices])

    # stop as a string and as a list.
    g = client.completions.create(model=model, prompt="the stint", max_tokens=40, temperature=0)
    t = g.choices[0].text
    for stop in (t[6:8], [t[6:8], "\u2603"]):
        s = client.completions.create(model=model, prompt="the stint", max_tokens=40, temperature=0, stop=stop)
        assert s.choices[0].text == t[: t.index(t[6:8])] and s.choices[0].finish_reason == "stop", (s, t)
    print("stop as a string and a list cut at", repr(t[6:8]))

    # Errors the client raises as typed exceptions.
    try:
        client.chat.completions.create(model=model, messages=[{"role": "wizard", "content": "x"}])
        raise AssertionError("role wizard accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "messages[0].role", e.body
    try:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}],
                                       tools=[{"type": "function", "function": {"name": "bad name"}}])
        raise AssertionError("a bad tool name accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "tools[0].function.name", e.body
    try:
        client.get("/nowhere", cast_to=object)
        raise AssertionError("unknown route answered")
    except openai.NotFoundError as e:
        assert e.body["type"] == "invalid_request_error", e.body
    print("errors: role, tool schema, unknown route")
    print("ok")


if __name__ == "__main__":
    main()
