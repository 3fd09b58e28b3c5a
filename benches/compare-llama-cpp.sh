#!/usr/bin/env bash
# baton against llama.cpp's C++ server (`llama-server`) on the same GGUF, measured by the same
# load generator in one invocation, one server at a time (never two at once: they would share
# the cores). Two workloads:
#   plain   128-token prompts, 128 output tokens, at 1 and then 8 concurrent streams;
#   prefix  a 1024-token system prompt every request shares plus 64 tokens of its own, 32 output
#           tokens, 4 concurrent streams;
#   chat    multi-turn chat: 8 conversations arriving at 0.5/s (Poisson), 4 turns each, every
#           turn's prompt = a 512-token system prompt + the conversation so far (the server's
#           own answers included) + a 48-token message, 48-token answers, 1 s mean think time.
#   The last two are what prefix caching is for: baton runs them with its prefix cache on and
#   off; llama-server keeps each slot's last prompt (cache_prompt, on by default).
#
#   benches/compare-llama-cpp.sh OUT_DIR [NUM_REQUESTS]
#
# Needs a release build (`cargo build --release -p baton`; $BATON overrides the binary) and
# llama-server ($LLAMA_SERVER, else built by scripts/build-llama-cpp.sh, about 10 minutes the
# first time). Writes OUT_DIR/<server>-<workload>-c<N>/{results.json,*.svg} and their .txt, and
# prints one table of all runs at the end (OUT_DIR/summary.md); servers' logs go to $TMPDIR.
#
# Fairness: the same seeded prompts and output lengths for every server, greedy, end tokens
# ignored (baton's and llama-server's `ignore_eos`), 2 threads each; llama-server with 8
# slots (-np 8) and room for the longest prompt in each, so it batches the 8 streams as baton
# does. Output tokens are counted from each server's reported usage.
set -euo pipefail

out=${1:?usage: $0 OUT_DIR [NUM_REQUESTS]}
n=${2:-16}
# shellcheck source=benches/peer-common.sh
. "$(dirname "$0")/peer-common.sh"

workload() { # name endpoint workload extra-args...
  local name=$1 endpoint=$2 kind=$3
  shift 3
  local c args
  local runs=() args=()
  case $kind in
    plain) runs=(c1 c8); args=(--num-requests "$n" --input-len 128 --output-len 128) ;;
    prefix) runs=(c4); args=(--num-requests "$n" --shared-prefix-len 1024 --input-len 64 --output-len 32) ;;
    chat) runs=(r0.5); args=(--conversations 8 --turns 4 --shared-prefix-len 512 --input-len 48
      --output-len 48 --think-time 1s) ;;
  esac
  for run in "${runs[@]}"; do
    local load=(--concurrency "${run#c}")
    [[ $run == r* ]] && load=(--rate "${run#r}")
    "$baton" bench serve --endpoint "$endpoint" "${load[@]}" --seed 7 --tokenizer "$model" \
      --no-progress --ignore-eos --slo ttft=1s,tpot=100ms "${args[@]}" \
      --out "$out/$name-$kind-$run" "$@" | tee "$out/$name-$kind-$run.txt"
  done
}

machine_info | tee "$out/machine.txt"

"$llama_server" -m "$model" -t 2 -tb 2 -c 16384 -np 8 --no-repack --host 127.0.0.1 --port $llama_port \
  >"${TMPDIR:-/tmp}/llama-server.log" 2>&1 &
children+=($!)
wait_http "http://127.0.0.1:$llama_port" /health
workload llama-server "http://127.0.0.1:$llama_port" plain
workload llama-server "http://127.0.0.1:$llama_port" prefix
workload llama-server "http://127.0.0.1:$llama_port" chat
kill "${children[-1]}"
wait "${children[-1]}" 2>/dev/null || true

run_baton() { # name workloads up-args...
  local name=$1 kinds=$2
  shift 2
  "$baton" up --model "$model" --http 127.0.0.1:$http_port --grpc 127.0.0.1:$grpc_port "$@" \
    >"${TMPDIR:-/tmp}/$name-up.log" 2>&1 &
  children+=($!)
  wait_http "http://127.0.0.1:$http_port" /ready
  for kind in $kinds; do
    workload "$name" "http://127.0.0.1:$http_port" "$kind"
  done
  kill -TERM "${children[-1]}"
  wait "${children[-1]}" 2>/dev/null || true
}

run_baton baton "plain prefix chat" --prefill 1 --decode 1
run_baton baton-nocache "prefix chat" --prefill 1 --decode 1 \
  --set prefill.engine.prefix_cache=false --set decode.engine.prefix_cache=false

python3 - "$out" <<'PY' | tee "$out/summary.md"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = []
for f in sorted(out.glob("*/results.json")):
    d = json.load(open(f))
    s = d["runs"][0]["summary"]
    rows.append((f.parent.name, s))
print("| server-workload-load | ok/sent | output tok/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | ITL p50 (ms) | E2E p50 (ms) | goodput (req/s) |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for name, s in rows:
    goodput = "-" if s.get("goodput") is None else f"{s['goodput']:.3f}"
    print(f"| {name} | {s['completed']}/{s['sent']} | {s['output_throughput']:.1f} | "
          f"{s['ttft']['median_ms']:.0f} / {s['ttft']['p99_ms']:.0f} | "
          f"{s['tpot']['median_ms']:.1f} / {s['tpot']['p99_ms']:.1f} | {s['itl']['median_ms']:.1f} | "
          f"{s['e2e']['median_ms']:.0f} | {goodput} |")
PY
