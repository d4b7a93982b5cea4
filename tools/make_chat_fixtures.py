#!/usr/bin/env python3
"""Builds tests/fixtures/chat/cases.json: golden renders of our two test chat templates.

The engine renders chat templates with minijinja, set up to match Hugging Face transformers'
`apply_chat_template` byte for byte. This script renders a fixed set of conversations with
transformers itself and stores the inputs with the exact text it produced, so a Rust test can
feed the same inputs to `ChatTemplate::render` and compare.

The templates are our own, written for these fixtures in the style of the real Qwen templates
(they use the same Jinja constructs, so the renderer is exercised the same way):

  tests/fixtures/chat/qwen35_style.jinja  Qwen3.5: XML tool calls, `<think>` generation prompt
  tests/fixtures/chat/qwen3_style.jinja   Qwen3 / Qwen3-Next: JSON tool calls, plain prompt

Rendering goes through a `PreTrainedTokenizerFast` built from
models/tiny-qwen35moe-4bit/tokenizer.json with `apply_chat_template(..., tokenize=False,
chat_template=<template text>)`, so the special-token variables (`eos_token`, ...) are the
ones transformers passes too; neither template reads them.

cases.json:

  {"generator": "transformers X.Y.Z apply_chat_template",
   "cases": [{"name": str, "template": file name in tests/fixtures/chat/,
              "messages": [...], "tools": [...], "add_generation_prompt": bool,
              "enable_thinking": null | bool,
              "expected": str            # or "error": true when transformers raises
             }, ...]}

`messages` are in the HF/OpenAI shape: `role`, `content` (a string), and optionally
`reasoning_content`, `tool_calls` ([{"id", "type": "function", "function": {"name",
"arguments": object}}]), `tool_call_id`, `name`. `tools` empty means `tools` was not passed;
`enable_thinking` null means the kwarg was not passed at all.

Usage (CPU only, a second; needs only transformers, tokenizers and jinja2):
  /work/pyenv/bin/python tools/make_chat_fixtures.py [--out tests/fixtures/chat/cases.json] [--show NAME ...]
"""

import argparse
import copy
import json
import sys
from pathlib import Path

import jinja2
import transformers
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
CHAT_DIR = ROOT / "tests" / "fixtures" / "chat"
TOKENIZER = ROOT / "models" / "tiny-qwen35moe-4bit" / "tokenizer.json"

QWEN35 = "qwen35_style.jinja"
QWEN3 = "qwen3_style.jinja"
BOTH = (QWEN35, QWEN3)

# ---------------------------------------------------------------------------------------------
# Building blocks

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city. Units are 'metric' or 'imperial'.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Zürich"},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
                "units": {"type": "string", "enum": ["metric", "imperial"]},
            },
            "required": ["city"],
        },
    },
}

SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search_docs",
        "description": "Full-text search over the manual; returns the best passages.",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string"},
                "top_k": {"type": "integer", "default": 3},
                "threshold": {"type": "number", "default": 0.5},
                "exact": {"type": "boolean"},
                "filters": {"type": "object", "additionalProperties": True},
                "tags": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["query"],
        },
    },
}

# Non-ASCII and the characters an HTML-escaping `tojson` would change.
ESCAPE_TOOL = {
    "type": "function",
    "function": {
        "name": "compare_prices",
        "description": "Compare prices <in €> & report which is cheaper; it's \"exact\". 价格比较 — naïve café ✓",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "number", "description": "first price (≥ 0)"},
                "b": {"type": "number", "description": "second price, <= 10^6"},
            },
            "required": ["a", "b"],
        },
    },
}


def user(text):
    return {"role": "user", "content": text}


def system(text):
    return {"role": "system", "content": text}


def assistant(text, reasoning=None, tool_calls=None):
    m = {"role": "assistant", "content": text}
    if reasoning is not None:
        m["reasoning_content"] = reasoning
    if tool_calls is not None:
        m["tool_calls"] = tool_calls
    return m


def call(call_id, name, arguments):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def tool_result(call_id, name, text):
    return {"role": "tool", "tool_call_id": call_id, "name": name, "content": text}


# Two calls whose arguments cover every kind of value: string (multi-line, non-ASCII), integer,
# floats (0.5, 1e-05, a whole 3.0, negative), booleans, null, a nested object and a list.
# (transformers drops None-valued keys of a message, but not deeper ones like these.)
TWO_CALLS = [
    call(
        "call_1",
        "search_docs",
        {
            "query": "chunked prefill\nand KV-cache reuse — Überblick",
            "top_k": 5,
            "threshold": 0.5,
            "epsilon": 1e-05,
            "exact": True,
            "cursor": None,
            "filters": {"section": "engine", "min_score": 0.25, "draft": False, "tags": ["moe", "kv"]},
            "tags": ["perf", "memory", 2, 1.5, None, True],
        },
    ),
    call("call_2", "get_weather", {"city": "Zürich", "days": 3, "scale": 3.0, "offset": -2.75, "metric": False}),
]

TWO_RESULTS = [
    tool_result("call_1", "search_docs", '[{"title": "Prefill", "score": 0.91}, {"title": "KV cache", "score": 0.87}]'),
    tool_result("call_2", "get_weather", "Zürich: 14 °C, light rain; tomorrow 17 °C & sunny."),
]

TOOL_ASK = user("How does chunked prefill work, and what's the weather in Zürich for the next 3 days?")
TOOL_CALLING = assistant(
    "Let me look both up.",
    reasoning="I need the docs search for prefill and the weather tool for Zürich.",
    tool_calls=TWO_CALLS,
)
TOOL_ANSWER = assistant(
    "Chunked prefill splits a long prompt into blocks; Zürich will be 14–17 °C with some rain.",
    reasoning="Both tools answered; summarise briefly.",
)

THINK_IN_CONTENT = assistant("<think>\nThe user greets me.\nI greet back.\n</think>\n\nHello! How can I help?")

# ---------------------------------------------------------------------------------------------
# Cases: (name, templates, messages, tools, add_generation_prompt, enable_thinking, expect_error)

CASES = [
    ("single_user", BOTH, [user("Hello! What's 2+2?")], [], True, None, False),
    ("system_user", BOTH, [system("You are a terse assistant."), user("Name a prime.")], [], True, None, False),
    (
        "system_padded_whitespace",
        BOTH,
        [system("\n  Be brief.  \n"), user("  spaces kept in user turns  ")],
        [],
        True,
        None,
        False,
    ),
    (
        "multi_turn_reasoning_content",
        BOTH,
        [
            system("You are helpful."),
            user("What is 2+2?"),
            assistant("2+2 is 4.", reasoning="Simple arithmetic: 2+2=4."),
            user("And 3+3?"),
        ],
        [],
        True,
        None,
        False,
    ),
    (
        "multi_turn_think_in_content",
        BOTH,
        [user("Hi!"), THINK_IN_CONTENT, user("Tell me a fact about octopuses.")],
        [],
        True,
        None,
        False,
    ),
    (
        "last_assistant_reasoning_content_no_prompt",
        BOTH,
        [user("What is 2+2?"), assistant("4", reasoning="\nAdd the numbers.\n")],
        [],
        False,
        None,
        False,
    ),
    (
        "last_assistant_think_in_content_no_prompt",
        BOTH,
        [user("Hi!"), THINK_IN_CONTENT],
        [],
        False,
        None,
        False,
    ),
    (
        "last_assistant_no_reasoning_no_prompt",
        BOTH,
        [system("Answer in one word."), user("Capital of France?"), assistant("Paris.")],
        [],
        False,
        None,
        False,
    ),
    ("enable_thinking_false", BOTH, [user("Quick: capital of Italy?")], [], True, False, False),
    ("enable_thinking_true", BOTH, [user("Think hard: is 91 prime?")], [], True, True, False),
    (
        "enable_thinking_false_multi_turn",
        BOTH,
        [user("What is 2+2?"), assistant("4", reasoning="Easy."), user("Times 10?")],
        [],
        True,
        False,
        False,
    ),
    ("tools_no_system", BOTH, [user("Weather in Oslo?")], [WEATHER_TOOL], True, None, False),
    (
        "tools_with_system",
        BOTH,
        [system("You are a weather bot.\n"), user("Weather in Oslo?")],
        [WEATHER_TOOL, SEARCH_TOOL],
        True,
        None,
        False,
    ),
    (
        "tool_calls_pending",
        BOTH,
        [system("Use tools when useful."), TOOL_ASK, TOOL_CALLING, *TWO_RESULTS],
        [SEARCH_TOOL, WEATHER_TOOL],
        True,
        None,
        False,
    ),
    (
        "tool_round_trip_answered",
        BOTH,
        [system("Use tools when useful."), TOOL_ASK, TOOL_CALLING, *TWO_RESULTS, TOOL_ANSWER],
        [SEARCH_TOOL, WEATHER_TOOL],
        False,
        None,
        False,
    ),
    (
        "tool_round_trip_then_new_user",
        BOTH,
        [
            system("Use tools when useful."),
            TOOL_ASK,
            TOOL_CALLING,
            *TWO_RESULTS,
            TOOL_ANSWER,
            user("Thanks! And in Bern?"),
        ],
        [SEARCH_TOOL, WEATHER_TOOL],
        True,
        None,
        False,
    ),
    (
        "tool_round_trip_thinking_off",
        BOTH,
        [TOOL_ASK, TOOL_CALLING, *TWO_RESULTS, TOOL_ANSWER, user("Thanks! And in Bern?")],
        [SEARCH_TOOL, WEATHER_TOOL],
        True,
        False,
        False,
    ),
    (
        "tool_call_without_content",
        BOTH,
        [
            user("Weather in Oslo?"),
            assistant("", tool_calls=[call("c9", "get_weather", {"city": "Oslo"})]),
            tool_result("c9", "get_weather", "Oslo: -3 °C, snow"),
        ],
        [WEATHER_TOOL],
        True,
        None,
        False,
    ),
    (
        "multi_step_tools",
        BOTH,
        [
            user("Compare the weather in Oslo and Bergen."),
            assistant("", reasoning="Oslo first.", tool_calls=[call("a", "get_weather", {"city": "Oslo"})]),
            tool_result("a", "get_weather", "Oslo: 2 °C"),
            assistant("Now Bergen.", reasoning="Then Bergen.", tool_calls=[call("b", "get_weather", {"city": "Bergen"})]),
            tool_result("b", "get_weather", "Bergen: 6 °C"),
        ],
        [WEATHER_TOOL],
        True,
        None,
        False,
    ),
    (
        "tool_output_as_user_message",
        BOTH,
        [
            user("Weather in Oslo?"),
            assistant("", reasoning="Call the tool.", tool_calls=[call("a", "get_weather", {"city": "Oslo"})]),
            user("<tool_response>\nOslo: 2 °C\n</tool_response>"),
        ],
        [WEATHER_TOOL],
        True,
        None,
        False,
    ),
    (
        "tool_call_string_arguments",
        (QWEN3,),
        [
            user("Weather in Oslo?"),
            assistant("", tool_calls=[call("a", "get_weather", '{"city": "Oslo", "days": 2}')]),
        ],
        [WEATHER_TOOL],
        False,
        None,
        False,
    ),
    (
        "unicode_and_escapes",
        BOTH,
        [
            system("Réponds en français & sois précis <toujours>."),
            user("Is 3 < 5 && 7 > 2? It's \"obvious\" — 对吧? 🙂"),
            assistant(
                "Oui : 3 < 5 & 7 > 2 — c'est vrai ✓",
                reasoning="Compare: 3<5 true, 7>2 true; l'utilisateur écrit en mélange 中文.",
            ),
            user("Merci ! Ça coûte 5 € <environ>?"),
        ],
        [ESCAPE_TOOL],
        True,
        None,
        False,
    ),
    (
        "unicode_tool_call",
        BOTH,
        [
            user("Which is cheaper: 4,99 € or 5 €?"),
            assistant(
                "Je compare <maintenant> & rends compte.",
                reasoning="Use compare_prices — it's exact.",
                tool_calls=[
                    call("p1", "compare_prices", {"a": 4.99, "b": 5, "note": "l'écart <1 € & \"petit\"", "ctx": {"devise": "€", "ok": True}})
                ],
            ),
            tool_result("p1", "compare_prices", "a < b: 4,99 € is cheaper ✓"),
        ],
        [ESCAPE_TOOL],
        True,
        None,
        False,
    ),
    (
        "system_not_first",
        BOTH,
        [user("Hello"), system("Late system message.")],
        [],
        True,
        None,
        True,
    ),
    (
        "system_not_first_with_tools",
        BOTH,
        [system("First."), user("Hello"), assistant("Hi."), system("Second system message.")],
        [WEATHER_TOOL],
        True,
        None,
        True,
    ),
]


def render(tokenizer, template_text, messages, tools, add_generation_prompt, enable_thinking):
    kwargs = {}
    if tools:
        kwargs["tools"] = copy.deepcopy(tools)
    if enable_thinking is not None:
        kwargs["enable_thinking"] = enable_thinking
    return tokenizer.apply_chat_template(
        copy.deepcopy(messages),
        chat_template=template_text,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        **kwargs,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=CHAT_DIR / "cases.json")
    parser.add_argument("--show", nargs="*", default=[], help="print these cases' renders")
    args = parser.parse_args()

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER))
    templates = {name: (CHAT_DIR / name).read_text() for name in BOTH}

    cases = []
    for name, which, messages, tools, add_generation_prompt, enable_thinking, expect_error in CASES:
        for template in which:
            case = {
                "name": f"{Path(template).stem.removesuffix('_style')}/{name}",
                "template": template,
                "messages": messages,
                "tools": tools,
                "add_generation_prompt": add_generation_prompt,
                "enable_thinking": enable_thinking,
            }
            try:
                text = render(tokenizer, templates[template], messages, tools, add_generation_prompt, enable_thinking)
            except jinja2.exceptions.TemplateError as e:
                if not expect_error:
                    sys.exit(f"{case['name']}: unexpected template error: {e}")
                print(f"{case['name']}: raises as expected: {e}")
                case["error"] = True
            else:
                if expect_error:
                    sys.exit(f"{case['name']}: expected the template to raise, got {text!r}")
                case["expected"] = text
            cases.append(case)
            if case["name"] in args.show or name in args.show:
                print(f"===== {case['name']}\n{case.get('expected', '<error>')}=====")

    out = {"generator": f"transformers {transformers.__version__} apply_chat_template", "cases": cases}
    # One case per line: small enough (~90 KB) and diffs stay readable.
    lines = [json.dumps(c, ensure_ascii=False) for c in cases]
    text = f'{{"generator": {json.dumps(out["generator"])}, "cases": [\n' + ",\n".join(lines) + "\n]}\n"
    assert json.loads(text) == out
    args.out.write_text(text)
    print(f"wrote {args.out} ({len(cases)} cases, {len(text.encode())} bytes)")


if __name__ == "__main__":
    main()
