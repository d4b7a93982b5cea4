"""Drives a running `flash-moe serve` with the official `openai` and `anthropic` Python SDKs,
plain HTTP and curl: chat (plain and streamed), tool-call round trips, legacy completions,
the error cases, concurrent requests, client disconnects and prefix reuse.

Run by crates/cli/tests/server_clients.rs against the bundled chat model (which was trained to
call `get_weather`), or by hand:

    flash-moe serve --model models/tiny-qwen35moe-chat-4bit --api-key k --max-context 1024 --max-body-mib 1 &
    python tests/clients/sdk_clients.py --base-url http://127.0.0.1:8000 --api-key k \
        --model tiny-qwen35moe-chat-4bit --max-context 1024 --max-body-mib 1

Greedy decoding throughout, so a streamed answer must equal the same request unstreamed.
Exits non-zero listing every failed check.
"""

import argparse
import concurrent.futures
import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

import anthropic
import openai

FAILURES = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        FAILURES.append(what)


def raises(kind, call):
    """The exception `call` raises, if it is a `kind`; None otherwise."""
    try:
        call()
    except kind as e:
        return e
    except Exception as e:  # noqa: BLE001 - reported as a failed check
        print(f"     raised {type(e).__name__}: {e}")
        return None
    return None


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name"}},
            "required": ["city"],
        },
    },
}
WEATHER_TOOL_ANTHROPIC = {
    "name": "get_weather",
    "description": "Current weather for a city.",
    "input_schema": WEATHER_TOOL["function"]["parameters"],
}
ASK = "What's the weather in Lisbon?"


def http(base, path, body=None, key=None, raw=None, method=None):
    """(status, parsed JSON or text) of one request."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(base + path, data=data, method=method or ("POST" if data is not None else "GET"))
    req.add_header("content-type", "application/json")
    if key:
        req.add_header("authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def openai_chat(client, model):
    msgs = [{"role": "user", "content": "Hello"}]
    r = client.chat.completions.create(model=model, messages=msgs, temperature=0, max_tokens=48)
    m = r.choices[0].message
    reasoning = (m.model_extra or {}).get("reasoning_content") or ""
    check(isinstance(m.content, str) and m.content.strip() != "", f"openai chat answers: {m.content!r}")
    check("<think>" not in (m.content or "") and "</think>" not in (m.content or ""), "no think tags in content")
    check(r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0, f"openai usage: {r.usage}")
    check(r.choices[0].finish_reason in ("stop", "length"), f"finish_reason {r.choices[0].finish_reason}")

    stream = client.chat.completions.create(
        model=model, messages=msgs, temperature=0, max_tokens=48, stream=True, stream_options={"include_usage": True}
    )
    content, s_reasoning, finish, usage = "", "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            content += c.delta.content or ""
            s_reasoning += (c.delta.model_extra or {}).get("reasoning_content") or ""
            finish = c.finish_reason or finish
    check(content == m.content, f"streamed content equals unstreamed: {content!r} vs {m.content!r}")
    check(s_reasoning == reasoning, f"streamed reasoning equals unstreamed: {s_reasoning!r} vs {reasoning!r}")
    check(finish == r.choices[0].finish_reason, "streamed finish_reason")
    check(usage is not None and usage.completion_tokens == r.usage.completion_tokens, f"streamed usage: {usage}")
    cached = (usage.prompt_tokens_details.cached_tokens if usage and usage.prompt_tokens_details else 0) or 0
    check(cached == usage.prompt_tokens if usage else False, f"an identical prompt is all cached: {cached}")


def openai_tools(client, model):
    msgs = [{"role": "user", "content": ASK}]
    r = client.chat.completions.create(model=model, messages=msgs, tools=[WEATHER_TOOL], temperature=0, max_tokens=96)
    m = r.choices[0].message
    calls = m.tool_calls or []
    check(r.choices[0].finish_reason == "tool_calls", f"finish_reason tool_calls: {r.choices[0].finish_reason}")
    check(len(calls) == 1 and calls[0].function.name == "get_weather", f"one get_weather call: {calls}")
    check(all(c.id.startswith("call_") for c in calls), f"tool call ids: {[c.id for c in calls]}")
    args = json.loads(calls[0].function.arguments) if calls else None
    check(args == {"city": "Lisbon"}, f"arguments are a JSON object: {args}")
    check("<tool_call>" not in (m.content or "") and "<function" not in (m.content or ""), f"no markup: {m.content!r}")

    stream = client.chat.completions.create(
        model=model, messages=msgs, tools=[WEATHER_TOOL], temperature=0, max_tokens=96, stream=True
    )
    text, streamed_calls, finish = "", {}, None
    for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
            for tc in c.delta.tool_calls or []:
                entry = streamed_calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = tc.id or entry["id"]
                entry["name"] += tc.function.name or ""
                entry["arguments"] += tc.function.arguments or ""
    check("<tool_call>" not in text and "<function" not in text and "<parameter" not in text, f"stream shows no markup: {text!r}")
    check(finish == "tool_calls", f"streamed finish_reason: {finish}")
    got = [(c["name"], json.loads(c["arguments"] or "null")) for c in streamed_calls.values()]
    check(got == [("get_weather", {"city": "Lisbon"})], f"streamed tool call: {got}")

    if calls:
        follow = msgs + [
            {"role": "assistant", "content": m.content, "tool_calls": [c.model_dump() for c in calls]},
            {"role": "tool", "tool_call_id": calls[0].id, "content": "Rainy, 12 °C"},
        ]
        r2 = client.chat.completions.create(model=model, messages=follow, tools=[WEATHER_TOOL], temperature=0, max_tokens=96)
        answer = r2.choices[0].message.content or ""
        check(r2.choices[0].finish_reason == "stop" and answer.strip() != "", f"answer after the tool result: {answer!r}")
        check("12" in answer, f"the answer uses the tool result: {answer!r}")
        cached = r2.usage.prompt_tokens_details.cached_tokens or 0
        check(cached > 0, f"the resent conversation reuses its prefix: {cached} of {r2.usage.prompt_tokens}")

    forced = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Hello"}],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=64,
    )
    fc = forced.choices[0].message.tool_calls or []
    check(len(fc) == 1 and fc[0].function.name == "get_weather", f"tool_choice forces the call: {fc}")
    if fc:
        check(isinstance(json.loads(fc[0].function.arguments), dict), "forced call arguments are an object")


def openai_choices(client, model):
    msgs = [{"role": "user", "content": "Hello"}]
    ask = {"model": model, "messages": msgs, "max_tokens": 24, "temperature": 2.0, "seed": 5}
    # The chat model thinks first: a choice's text is its reasoning and its answer.
    said = lambda m: ((m.model_extra or {}).get("reasoning_content") or "") + (m.content or "")
    r = client.chat.completions.create(**ask, n=3)
    texts = [said(c.message) for c in sorted(r.choices, key=lambda c: c.index)]
    check([c.index for c in r.choices] == [0, 1, 2], f"n=3: three choices in order: {[c.index for c in r.choices]}")
    singles = [client.chat.completions.create(**{**ask, "seed": 5 + i}) for i in range(3)]
    check(texts == [said(s.choices[0].message) for s in singles], "choice i samples as a request with seed + i")
    check(len(set(texts)) > 1, f"sampled choices differ: {texts}")
    check(r.usage.prompt_tokens == singles[0].usage.prompt_tokens
          and r.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles),
          f"usage: the prompt once, the choices' tokens summed: {r.usage}")
    streamed = {}
    finishes = {}
    for chunk in client.chat.completions.create(**ask, n=3, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + said(c.delta)
            finishes[c.index] = c.finish_reason or finishes.get(c.index)
    check([streamed.get(i) for i in range(3)] == texts, f"streamed choices equal unstreamed: {streamed}")
    check(all(finishes.get(i) for i in range(3)), f"each streamed choice finishes: {finishes}")
    greedy = client.chat.completions.create(model=model, messages=msgs, max_tokens=12, temperature=0, n=2)
    check(said(greedy.choices[0].message) == said(greedy.choices[1].message) != "", "greedy choices agree")
    c = client.completions.create(model=model, prompt="def main():", max_tokens=8, temperature=1.0, seed=3, n=2)
    s_text = {}
    for chunk in client.completions.create(model=model, prompt="def main():", max_tokens=8, temperature=1.0, seed=3,
                                           n=2, stream=True):
        for ch in chunk.choices:
            s_text[ch.index] = s_text.get(ch.index, "") + ch.text
    check([s_text.get(i) for i in range(2)] == [x.text for x in c.choices] and c.usage.completion_tokens == 16,
          f"completions n=2, streamed and not: {s_text} {c.choices} {c.usage}")
    for bad in (0, 17):
        e = raises(openai.BadRequestError, lambda: client.chat.completions.create(**ask, n=bad))
        check(e is not None and e.param == "n", f"n={bad}: 400 naming n ({e})")


def openai_completions(client, model):
    r = client.completions.create(model=model, prompt="def main():", max_tokens=8, temperature=0)
    text = r.choices[0].text
    check(isinstance(text, str) and r.usage.completion_tokens == 8, f"completions: {text!r} {r.usage}")
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt="def main():", max_tokens=8, temperature=0, stream=True) if c.choices)
    check(streamed == text, f"streamed completion equals unstreamed: {streamed!r}")
    stop = client.completions.create(model=model, prompt="def main():", max_tokens=8, temperature=0, stop=[text[2:4]])
    check(stop.choices[0].finish_reason == "stop" and text[2:4] not in stop.choices[0].text, f"stop string: {stop.choices[0]}")


def openai_logprobs(client, model):
    msgs = [{"role": "user", "content": "Hello"}]
    ask = {"model": model, "messages": msgs, "temperature": 0, "max_tokens": 12}
    r = client.chat.completions.create(**ask, logprobs=True, top_logprobs=3)
    entries = r.choices[0].logprobs.content if r.choices[0].logprobs else []
    check(len(entries) > 0 and all(len(e.top_logprobs) == 3 for e in entries),
          f"chat logprobs with 3 alternatives: {len(entries)} entries")
    check(all(e.token == e.top_logprobs[0].token and e.logprob == e.top_logprobs[0].logprob for e in entries),
          "greedy: each token is its most likely")
    check(all(a.logprob >= b.logprob for e in entries for a, b in zip(e.top_logprobs, e.top_logprobs[1:])),
          "alternatives most likely first")
    check(all(e.logprob <= 0 and bytes(e.bytes).decode("utf-8", "replace") == e.token for e in entries),
          "log-probabilities at most 0, bytes and tokens agree")
    streamed = [e for chunk in client.chat.completions.create(**ask, logprobs=True, top_logprobs=3, stream=True)
                for c in chunk.choices if c.logprobs and c.logprobs.content for e in c.logprobs.content]
    check([(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries],
          "streamed chat logprobs equal unstreamed")
    check(client.chat.completions.create(**ask).choices[0].logprobs is None, "no logprobs unless asked for")
    e = raises(openai.BadRequestError, lambda: client.chat.completions.create(**ask, top_logprobs=2))
    check(e is not None, "top_logprobs without logprobs: BadRequestError")
    e = raises(openai.BadRequestError, lambda: client.chat.completions.create(**ask, logprobs=True, top_logprobs=21))
    check(e is not None, "top_logprobs over 20: BadRequestError")

    plain = {"model": model, "prompt": "def main():", "max_tokens": 8, "temperature": 0, "logprobs": 2}
    c = client.completions.create(**plain)
    lp = c.choices[0].logprobs
    check(lp is not None and "".join(lp.tokens) == c.choices[0].text and len(lp.token_logprobs) == len(lp.tokens)
          and all(0 < len(t) <= 2 for t in lp.top_logprobs), f"completion logprobs: {lp}")
    if lp is not None:
        offsets = [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
        check(lp.text_offset == offsets, f"completion text offsets: {lp.text_offset}")
        s_tokens = [t for chunk in client.completions.create(**plain, stream=True)
                    if chunk.choices and chunk.choices[0].logprobs for t in chunk.choices[0].logprobs.tokens]
        check(s_tokens == lp.tokens, f"streamed completion logprobs: {s_tokens}")

    # What evaluation harnesses ask for: the prompt's own log-probabilities (echo), with or
    # without a continuation.
    prompt = "def main():\n    return 1"
    e = client.completions.create(model=model, prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0)
    el = e.choices[0].logprobs
    check(e.choices[0].text == prompt and el is not None and "".join(el.tokens) == prompt
          and len(el.tokens) == e.usage.prompt_tokens and el.token_logprobs[0] is None and el.top_logprobs[0] is None
          and all(x <= 0 for x in el.token_logprobs[1:]), f"echo with max_tokens 0: {e.choices[0]}")
    both = client.completions.create(**plain, echo=True)
    bl = both.choices[0].logprobs
    check(both.choices[0].text == "def main():" + c.choices[0].text and bl is not None
          and bl.tokens[-len(lp.tokens):] == lp.tokens
          and all(abs(a - b) < 1e-3 for a, b in zip(bl.token_logprobs[-len(lp.tokens):], lp.token_logprobs)),
          f"echo with a continuation: {both.choices[0]}")
    e = raises(openai.BadRequestError, lambda: list(client.completions.create(**plain, echo=True, stream=True)))
    check(e is not None, "echo with stream: BadRequestError")


def openai_errors(base, key, model, max_context):
    bad_key = openai.OpenAI(base_url=base + "/v1", api_key="wrong")
    e = raises(openai.AuthenticationError, lambda: bad_key.models.list())
    check(e is not None and e.status_code == 401, "wrong key: 401 AuthenticationError")
    client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
    msgs = [{"role": "user", "content": "Hi"}]
    e = raises(openai.NotFoundError, lambda: client.chat.completions.create(model="no-such-model", messages=msgs))
    check(e is not None and e.code == "model_not_found", f"unknown model: 404 model_not_found ({e})")
    long = [{"role": "user", "content": "word " * (max_context * 2)}]
    e = raises(openai.BadRequestError, lambda: client.chat.completions.create(model=model, messages=long, max_tokens=4))
    check(e is not None and e.code == "context_length_exceeded", f"too long: 400 context_length_exceeded ({e})")
    e = raises(openai.BadRequestError, lambda: client.chat.completions.create(model=model, messages=msgs, temperature=5))
    check(e is not None and e.param == "temperature", f"temperature out of range: 400 ({e})")
    e = raises(openai.BadRequestError, lambda: client.chat.completions.create(
        model=model, messages=[{"role": "system", "content": "a"}, {"role": "user", "content": "b"}, {"role": "system", "content": "c"}]))
    check(e is not None, "a template that rejects the conversation: 400")


def raw_http_errors(base, key, model, max_body_mib):
    status, body = http(base, "/v1/chat/completions", raw=b'{"model": ', key=key)
    check(status == 400 and body["error"]["type"] == "invalid_request_error", f"malformed JSON: {status} {body}")
    status, body = http(base, "/v1/chat/completions", {"model": model, "messages": "hi"}, key=key)
    check(status == 400 and body["error"]["param"] == "messages", f"wrong field type: {status} {body}")
    status, body = http(base, "/v1/chat/completions", {"model": model, "messages": [], "max_tokens": "ten"}, key=key)
    check(status == 400 and body["error"]["param"] == "max_tokens", f"wrong field type names it: {status} {body}")
    big = {"model": model, "messages": [{"role": "user", "content": "x" * (max_body_mib * 2 << 20)}]}
    try:
        status, body = http(base, "/v1/chat/completions", big, key=key)
    except urllib.error.URLError as e:
        # The server answers 413 and closes once the limit is read; a client still sending
        # the rest may see the connection closed before it reads the answer.
        if not isinstance(e.reason, (BrokenPipeError, ConnectionResetError)):
            raise
        status = f"connection closed while sending ({e.reason})"
    check(status == 413 or str(status).startswith("connection closed"), f"oversized body: {status}")
    status, body = http(base, "/v1/chat/completions", {"model": model, "messages": []})
    check(status == 401 and body["error"]["code"] == "invalid_api_key", f"missing key: {status} {body}")
    status, body = http(base, "/v1/nothing", key=key)
    check(status == 404 and "error" in body, f"unknown route: {status} {body}")
    status, body = http(base, "/health")
    check(status == 200 and body == {"status": "ok"}, f"health without a key: {status} {body}")
    status, body = http(base, "/v1/messages", {"model": model, "messages": []}, key=key)
    check(status == 400 and body.get("type") == "error" and body["error"]["type"] == "invalid_request_error",
          f"Anthropic-shaped 400 (max_tokens missing): {status} {body}")
    status, body = http(base, "/v1/messages", {"model": "nope", "max_tokens": 4, "messages": []}, key=key)
    check(status == 404 and body["error"]["type"] == "not_found_error", f"Anthropic-shaped 404: {status} {body}")


def curl_stream(base, key, model):
    if shutil.which("curl") is None:
        check(False, "curl is installed")
        return
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8,
                       "temperature": 0, "stream": True})
    out = subprocess.run(["curl", "-sN", base + "/v1/chat/completions", "-H", f"Authorization: Bearer {key}",
                          "-H", "Content-Type: application/json", "-d", body], capture_output=True, text=True, timeout=120)
    lines = [l for l in out.stdout.splitlines() if l.startswith("data: ")]
    check(len(lines) >= 3 and lines[-1] == "data: [DONE]", f"curl sees an SSE stream ending in [DONE]: {lines[-2:]}")


def anthropic_messages(base, key, model):
    # The SDK no longer takes sampling settings; the server still reads `temperature`.
    client = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0)
    greedy = {"extra_body": {"temperature": 0}}
    msgs = [{"role": "user", "content": "Hello"}]
    r = client.messages.create(model=model, max_tokens=48, messages=msgs, **greedy)
    text = "".join(b.text for b in r.content if b.type == "text")
    check(text.strip() != "" and r.stop_reason in ("end_turn", "max_tokens"), f"anthropic answers: {text!r} {r.stop_reason}")
    with client.messages.stream(model=model, max_tokens=48, messages=msgs, **greedy) as s:
        final = s.get_final_message()
    s_text = "".join(b.text for b in final.content if b.type == "text")
    check(s_text == text, f"anthropic streamed text equals unstreamed: {s_text!r}")
    check([b.type for b in final.content] == [b.type for b in r.content], "same blocks streamed and not")
    # A stop sequence taken from the greedy answer: the message ends before it and names it.
    stop = text.strip()[2:5]
    stops = ["never in the answer", stop]
    r = client.messages.create(model=model, max_tokens=48, messages=msgs, stop_sequences=stops, **greedy)
    s_text = "".join(b.text for b in r.content if b.type == "text")
    check(r.stop_reason == "stop_sequence" and r.stop_sequence == stop and s_text == text[:text.find(stop)],
          f"anthropic stop_sequence: {r.stop_reason} {r.stop_sequence!r} {s_text!r}")
    with client.messages.stream(model=model, max_tokens=48, messages=msgs, stop_sequences=stops, **greedy) as s:
        final = s.get_final_message()
    check(final.stop_reason == "stop_sequence" and final.stop_sequence == stop,
          f"anthropic streamed stop_sequence: {final.stop_reason} {final.stop_sequence!r}")

    ask = [{"role": "user", "content": ASK}]
    r = client.messages.create(model=model, max_tokens=96, messages=ask, tools=[WEATHER_TOOL_ANTHROPIC], **greedy)
    uses = [b for b in r.content if b.type == "tool_use"]
    check(r.stop_reason == "tool_use" and len(uses) == 1 and uses[0].input == {"city": "Lisbon"},
          f"anthropic tool_use: {r.stop_reason} {uses}")
    check(all(u.id.startswith("toolu_") for u in uses), f"anthropic tool_use ids: {[u.id for u in uses]}")
    with client.messages.stream(model=model, max_tokens=96, messages=ask, tools=[WEATHER_TOOL_ANTHROPIC], **greedy) as s:
        final = s.get_final_message()
    s_uses = [b for b in final.content if b.type == "tool_use"]
    check(len(s_uses) == 1 and s_uses[0].input == {"city": "Lisbon"}, f"anthropic streamed tool_use: {s_uses}")
    if uses:
        follow = ask + [
            {"role": "assistant", "content": [b.model_dump() for b in r.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "Rainy, 12 °C"}]},
        ]
        r2 = client.messages.create(model=model, max_tokens=96, messages=follow, tools=[WEATHER_TOOL_ANTHROPIC], **greedy)
        answer = "".join(b.text for b in r2.content if b.type == "text")
        check(r2.stop_reason == "end_turn" and "12" in answer, f"anthropic answer after tool_result: {answer!r}")

    bad = anthropic.Anthropic(base_url=base, api_key="wrong", max_retries=0)
    e = raises(anthropic.AuthenticationError, lambda: bad.messages.create(model=model, max_tokens=4, messages=msgs))
    check(e is not None, "anthropic wrong key: AuthenticationError")
    e = raises(anthropic.NotFoundError, lambda: client.messages.create(model="nope", max_tokens=4, messages=msgs))
    check(e is not None, "anthropic unknown model: NotFoundError")


def concurrency(client, model):
    prompts = [f"Tell me about {w}" for w in ("rivers", "trees", "stars", "bread")]

    def ask(p):
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": p}], temperature=0, max_tokens=24)
        return r.choices[0].message.content

    alone = [ask(p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(ask, prompts))
    check(together == alone, "concurrent requests give what each gives alone")


def metric(base, name):
    _, text = http(base, "/metrics")
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def disconnect(base, key, model):
    before = metric(base, "flash_moe_requests_cancelled_total")
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Write a long story."}],
                       "max_tokens": 100000, "temperature": 0.8, "stream": True}).encode()
    req = urllib.request.Request(base + "/v1/chat/completions", data=body, method="POST")
    req.add_header("content-type", "application/json")
    req.add_header("authorization", f"Bearer {key}")
    with urllib.request.urlopen(req, timeout=60) as r:
        for _ in range(3):
            r.readline()
    deadline = time.time() + 20
    after = before
    while time.time() < deadline and after == before:
        time.sleep(0.2)
        after = metric(base, "flash_moe_requests_cancelled_total")
    check(after is not None and before is not None and after > before, f"a disconnected client stops its generation ({before} -> {after})")
    check(metric(base, "flash_moe_requests_running") == 0, "nothing left running")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", required=True)
    p.add_argument("--api-key", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--max-context", type=int, required=True)
    p.add_argument("--max-body-mib", type=int, required=True)
    a = p.parse_args()
    base = a.base_url.rstrip("/")
    client = openai.OpenAI(base_url=base + "/v1", api_key=a.api_key, max_retries=0)
    check(a.model in [m.id for m in client.models.list()], "the model is listed")
    openai_chat(client, a.model)
    openai_tools(client, a.model)
    openai_completions(client, a.model)
    openai_choices(client, a.model)
    openai_logprobs(client, a.model)
    openai_errors(base, a.api_key, a.model, a.max_context)
    raw_http_errors(base, a.api_key, a.model, a.max_body_mib)
    curl_stream(base, a.api_key, a.model)
    anthropic_messages(base, a.api_key, a.model)
    concurrency(client, a.model)
    disconnect(base, a.api_key, a.model)
    _, text = http(base, "/metrics")
    check("flash_moe_requests_total{" in text and "flash_moe_expert_fetches_total" in text, "metrics exposed")
    print(f"{len(FAILURES)} failed checks")
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()
