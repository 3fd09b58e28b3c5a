#!/usr/bin/env python3
"""A prompt longer than one prefill chunk (512 tokens) gives other greedy tokens when it is
served again from the prefix cache than when it was computed fresh.

Found while building `baton-lab chaos` (kill-prefill compares a run with a run that starts from
the cache). Starts its own prefill worker, decode worker and coordinator (release build, ports
chosen by the OS, 127.0.0.1), sends each prompt twice, one after the other, and compares the
two answers' text and the log-probabilities of their first 4 tokens. Standard library only.

    BATON_MODEL=~/.cache/baton/models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        python3 prefix-cache-repro.py [LENGTH ...]

Environment: PD (pd_mode, default force; `off` runs it aggregated on the decode worker),
PARGS / DARGS (extra flags for the prefill / decode worker, e.g.
PARGS="--set prefill.engine.prefix_cache=false").
"""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

MODEL = os.environ["BATON_MODEL"]
BATON = os.path.join(os.path.dirname(__file__), "../../../target/release/baton")
PROMPTS = 2


def start(args, announced, procs):
    p = subprocess.Popen([BATON] + args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True, start_new_session=True)
    procs.append(p)
    addrs = []
    while len(addrs) < announced:
        line = p.stdout.readline()
        if not line:
            raise SystemExit(f"{args[0]} exited before listening")
        if line.startswith("listening "):
            addrs.append(line.strip().split("=")[1])
    return addrs


def prompts(n, seed, length):
    # The same pseudo-random walk over ordinary vocabulary as lab/src/chaos.rs `prompts`.
    out = []
    for i in range(n):
        x = (seed * 0x9E3779B97F4A7C15 + i + 1) & (2**64 - 1)
        p = []
        for _ in range(length):
            x = (x * 6364136223846793005 + 1442695040888963407) & (2**64 - 1)
            p.append(300 + ((x >> 33) % 10000))
        out.append(p)
    return out


def complete(http, prompt):
    body = json.dumps({"prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True,
                       "pd_mode": os.environ.get("PD", "force"), "logprobs": 1}).encode()
    req = urllib.request.Request(f"http://{http}/v1/completions", body,
                                 {"Content-Type": "application/json"})
    j = json.load(urllib.request.urlopen(req, timeout=600))
    c = j["choices"][0]
    return c["text"], j["usage"]["prompt_tokens_details"]["cached_tokens"], \
        c["logprobs"]["token_logprobs"][:4]


def one_length(length):
    procs = []
    try:
        common = ["--model", MODEL, "--listen", "127.0.0.1:0", "--no-metrics"]
        p = start(["prefill"] + common + os.environ.get("PARGS", "").split(), 1, procs)[0]
        d = start(["decode"] + common + os.environ.get("DARGS", "").split(), 1, procs)[0]
        _, http = start(["coordinator", "--model", MODEL, "--grpc", "127.0.0.1:0", "--http",
                         "127.0.0.1:0", "--prefill-worker", p, "--decode-worker", d], 2, procs)
        deadline = time.time() + 60
        while True:
            try:
                if urllib.request.urlopen(f"http://{http}/ready").status == 200:
                    break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        same, worst = True, 0.0
        for prompt in prompts(PROMPTS, 2, length):
            fresh = complete(http, prompt)
            cached = complete(http, prompt)
            same &= fresh[0] == cached[0]
            worst = max([worst] + [abs(a - b) for a, b in zip(fresh[2], cached[2])])
            print(f"  fresh  cached={fresh[1]:>5} {fresh[0]!r:<40} logprobs {fresh[2]}")
            print(f"  again  cached={cached[1]:>5} {cached[0]!r:<40} logprobs {cached[2]}")
        print(f"length {length}: same text {same}, largest log-probability difference "
              f"(first 4 tokens) {worst:.2e}", flush=True)
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)


for n in [int(a) for a in sys.argv[1:]] or [480, 512, 528, 576, 600, 768, 1000, 1024, 1040]:
    one_length(n)
