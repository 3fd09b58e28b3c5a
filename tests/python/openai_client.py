#!/usr/bin/env python3
"""Drives baton's OpenAI-compatible HTTP frontend with the official `openai` package.

    python3 tests/python/openai_client.py http://127.0.0.1:8080/v1

Checks /v1/models, completions and chat completions (one JSON body and SSE streaming, greedy, so
both must produce the same text), streaming usage, and that invalid requests come back as the
SDK's BadRequestError. Prints one line per check; exits non-zero on the first failure. Run by
cli/tests/clients.rs against a cluster `baton up` started.
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

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name one colour of the rainbow."}]
MAX_TOKENS = 8


def check_models(client):
    models = client.models.list().data
    check(len(models) == 1, f"/v1/models lists {len(models)} models, expected 1: {models}")
    check(models[0].id, f"the model has no id: {models[0]}")
    ok(f"models.list() -> [{models[0].id!r}]")
    return models[0].id


def check_usage(usage, where):
    check(usage is not None, f"{where}: no usage")
    check(usage.prompt_tokens > 0, f"{where}: usage.prompt_tokens = {usage.prompt_tokens}")
    check(
        0 < usage.completion_tokens <= MAX_TOKENS,
        f"{where}: usage.completion_tokens = {usage.completion_tokens}, "
        f"expected 1..={MAX_TOKENS}",
    )
    check(
        usage.total_tokens == usage.prompt_tokens + usage.completion_tokens,
        f"{where}: usage.total_tokens = {usage.total_tokens} is not prompt + completion",
    )


def check_completions(client, model):
    whole = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0
    )
    check(len(whole.choices) == 1, f"completion has {len(whole.choices)} choices")
    text = whole.choices[0].text
    check(text, f"completion text is empty: {whole}")
    check(
        whole.choices[0].finish_reason in ("stop", "length"),
        f"completion finish_reason = {whole.choices[0].finish_reason!r}",
    )
    check_usage(whole.usage, "completion")
    ok(f"completions.create -> {text!r}, usage {whole.usage.completion_tokens} tokens")

    pieces = []
    finish = None
    for chunk in client.completions.create(
        model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=True
    ):
        for choice in chunk.choices:
            pieces.append(choice.text or "")
            finish = choice.finish_reason or finish
    streamed = "".join(pieces)
    check(
        streamed == text,
        f"streamed completion {streamed!r} differs from the non-streamed {text!r} (greedy)",
    )
    check(finish == whole.choices[0].finish_reason, f"streamed finish_reason = {finish!r}")
    ok(f"completions.create(stream=True) -> same text in {len(pieces)} chunks")


def check_chat(client, model):
    whole = client.chat.completions.create(
        model=model, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0
    )
    check(len(whole.choices) == 1, f"chat completion has {len(whole.choices)} choices")
    message = whole.choices[0].message
    check(message.role == "assistant", f"chat message role = {message.role!r}")
    check(message.content, f"chat message content is empty: {whole}")
    check_usage(whole.usage, "chat completion")
    ok(f"chat.completions.create -> {message.content!r}")

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
    check(len(chunks) >= 2, f"streamed chat has {len(chunks)} chunks")
    last = chunks[-1]
    check(last.choices == [], f"the usage chunk has choices: {last.choices}")
    check_usage(last.usage, "streamed chat's last chunk")
    check(
        last.usage.completion_tokens == whole.usage.completion_tokens,
        f"streamed usage {last.usage} differs from the non-streamed {whole.usage}",
    )
    for c in chunks[:-1]:
        check(c.usage is None, f"a chunk before the last carries usage: {c}")
    check(
        chunks[0].choices and chunks[0].choices[0].delta.role == "assistant",
        f"the first chunk does not carry role assistant: {chunks[0]}",
    )
    streamed = "".join(
        choice.delta.content or "" for c in chunks for choice in c.choices
    )
    check(
        streamed == message.content,
        f"streamed chat {streamed!r} differs from the non-streamed {message.content!r} (greedy)",
    )
    ok(
        f"chat.completions.create(stream=True, include_usage) -> same text, "
        f"usage in the last of {len(chunks)} chunks"
    )


def expect_bad_request(what, call, names):
    try:
        call()
    except openai.BadRequestError as e:
        check(e.status_code == 400, f"{what}: status {e.status_code}, expected 400")
        check(
            names in str(e),
            f"{what}: the error does not name {names!r}: {e}",
        )
        ok(f"{what} -> BadRequestError: {e.message}")
        return
    except openai.APIError as e:
        raise CheckFailed(f"{what}: expected BadRequestError, got {type(e).__name__}: {e}")
    raise CheckFailed(f"{what}: the request succeeded, expected BadRequestError")


def check_errors(client, model):
    expect_bad_request(
        "completions.create(temperature=-1)",
        lambda: client.completions.create(
            model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=-1
        ),
        "temperature",
    )
    expect_bad_request(
        "chat.completions.create(role='wizard')",
        lambda: client.chat.completions.create(
            model=model,
            messages=[{"role": "wizard", "content": "abracadabra"}],
            max_tokens=MAX_TOKENS,
        ),
        "wizard",
    )


def main():
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} BASE_URL  (e.g. http://127.0.0.1:8080/v1)")
    # No retries: a failure should show on the first attempt, not be papered over.
    client = openai.OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0, timeout=120)
    try:
        model = check_models(client)
        check_completions(client, model)
        check_chat(client, model)
        check_errors(client, model)
    except CheckFailed as e:
        sys.exit(f"FAILED: {e}")
    print(f"openai {openai.__version__}: all checks passed against {sys.argv[1]}")


if __name__ == "__main__":
    main()
