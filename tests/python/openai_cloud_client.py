#!/usr/bin/env python3
"""Drives a request that baton sends to a cloud upstream through the official `openai` package.

    python3 tests/python/openai_cloud_client.py http://127.0.0.1:8080/v1 MODEL http://127.0.0.1:9090/v1 REMOTE

MODEL is a model only the coordinator's cloud upstream serves; the upstream is another baton at
the third URL, serving it as REMOTE. Checks that /v1/models lists MODEL, that chat and completions
stream through the coordinator token by token with a finish reason and usage, that the streamed
text equals the one-body text and the text the upstream gives when called directly (greedy), and
that the `baton` field says it ran on the cloud and what it cost. Prints one line per check;
exits non-zero on the first failure. Run by cli/tests/cloud.rs.
"""

import sys

try:
    import openai
except ImportError as e:
    sys.exit(
        f"missing Python package ({e}); run: "
        "python3 -m pip install -r tests/python/requirements.txt"
    )

from checks import CheckFailed, check, ok  # noqa: E402 (after the dependency check)

CHAT = [{"role": "user", "content": "Name one colour of the rainbow."}]
PROMPT = "The capital of France is"
MAX_TOKENS = 8


def baton_field(obj):
    extra = getattr(obj, "model_extra", None) or {}
    return extra.get("baton")


def main():
    base, model, upstream_base, remote = sys.argv[1:5]
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
    upstream = openai.OpenAI(base_url=upstream_base, api_key="unused", max_retries=0)

    models = {m.id: m for m in client.models.list().data}
    check(model in models, f"/v1/models does not list {model!r}: {list(models)}")
    check(
        models[model].owned_by.startswith("cloud:"),
        f"{model!r} is owned by {models[model].owned_by!r}, expected cloud:<endpoint>",
    )
    ok(f"models.list() lists {model!r} owned by {models[model].owned_by!r}")

    # Chat: one body, a stream, and the upstream called directly.
    whole = client.chat.completions.create(
        model=model, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0
    )
    text = whole.choices[0].message.content
    check(text, "the chat reply is empty")
    placement = baton_field(whole)
    check(placement and placement["mode"] == "cloud", f"baton field: {placement}")
    check(placement["cost_usd"] > 0, f"no cost reported: {placement}")
    check(whole.usage.completion_tokens > 0, f"usage: {whole.usage}")
    ok(f"chat one body: {text!r}, on {placement['upstream']}, ${placement['cost_usd']:.6f}")

    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=CHAT,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    streamed = "".join(pieces)
    check(streamed == text, f"streamed {streamed!r} != one body {text!r}")
    check(
        sum(1 for p in pieces if p) >= 2,
        f"the text did not arrive in pieces: {pieces!r}",
    )
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    check(finishes in (["length"], ["stop"]), f"finish reasons: {finishes}")
    check(chunks[-1].usage is not None, "no usage chunk at the end of the stream")
    ok(f"chat stream: {len(pieces)} chunks, finish {finishes[0]}, usage {chunks[-1].usage.completion_tokens} tokens")

    direct = upstream.chat.completions.create(
        model=remote, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0
    )
    check(
        direct.choices[0].message.content == text,
        f"the upstream called directly says {direct.choices[0].message.content!r}, through baton {text!r}",
    )
    check(
        direct.usage.completion_tokens == whole.usage.completion_tokens
        and direct.usage.prompt_tokens == whole.usage.prompt_tokens,
        f"usage differs: direct {direct.usage}, through baton {whole.usage}",
    )
    ok("chat equals the upstream called directly (text and usage)")

    # Completions, streamed.
    stream = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    text = "".join(c.choices[0].text for c in stream if c.choices)
    direct = upstream.completions.create(
        model=remote, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0
    )
    check(text == direct.choices[0].text, f"completion {text!r} != direct {direct.choices[0].text!r}")
    ok(f"completion stream: {text!r}")

    # A field no cloud endpoint takes is refused for a cloud-only model, naming the field.
    try:
        client.completions.create(model=model, prompt=[1, 2, 3], max_tokens=2)
        raise CheckFailed("token ids to a cloud-only model were accepted")
    except openai.BadRequestError as e:
        check("prompt" in str(e), f"the error does not name the field: {e}")
        ok("token ids to a cloud-only model -> 400 naming prompt")


if __name__ == "__main__":
    try:
        main()
    except CheckFailed as e:
        print(f"FAILED: {e}", flush=True)
        sys.exit(1)
