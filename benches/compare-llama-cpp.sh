#!/usr/bin/env bash
# baton against llama.cpp's server on the same GGUF, measured by the same load generator in one
# invocation: one stream, then 8 concurrent streams, for each server in turn (never two servers at
# once: they would share the cores).
#
#   benches/compare-llama-cpp.sh OUT_DIR [NUM_REQUESTS]
#
# Needs a release build (`cargo build --release -p baton`; $BATON overrides the binary) and
# `pip install 'llama-cpp-python[server]'`. Writes OUT_DIR/<server>-c<N>/{results.json,*.svg},
# OUT_DIR/<server>-c<N>.txt, and prints one table of all runs at the end (OUT_DIR/summary.md);
# the servers' own logs go to $TMPDIR (default /tmp).
#
# Fairness: the same seeded prompts (128 tokens) and 128 output tokens for every server. baton is
# asked with ignore_eos; llama-cpp-python's server has no ignore_eos, so it gets a logit bias of
# -100 on SmolLM2's end tokens (0 <|endoftext|>, 2 <|im_end|>) instead, which has the same effect
# on a greedy answer. It reports no usage while streaming, so its output tokens are counted as text
# chunks (one per token there; the summary marks the column). Both run on 2 threads.
set -euo pipefail

out=${1:?usage: $0 OUT_DIR [NUM_REQUESTS]}
n=${2:-16}
root=$(cd "$(dirname "$0")/.." && pwd)
baton=${BATON:-$root/target/release/baton}
model=$("$root/scripts/fetch-model.sh")
mkdir -p "$out"
out=$(cd "$out" && pwd)

llama_port=18091
http_port=18081
grpc_port=18052
children=()
cleanup() {
  for pid in "${children[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

wait_http() { # base-url path: until the path answers 200
  for _ in $(seq 1 600); do
    curl -sf "$1$2" >/dev/null && return 0
    sleep 0.2
  done
  echo "no answer from $1" >&2
  return 1
}

bench() { # name endpoint extra-args...
  local name=$1 endpoint=$2
  shift 2
  for c in 1 8; do
    "$baton" bench serve --endpoint "$endpoint" --concurrency "$c" --num-requests "$n" \
      --input-len 128 --output-len 128 --seed 7 --tokenizer "$model" --no-progress \
      --slo ttft=1s,tpot=100ms --out "$out/$name-c$c" "$@" | tee "$out/$name-c$c.txt"
  done
}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(nproc) cores"
  echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
  python3 -c 'import llama_cpp; print("llama-cpp-python", llama_cpp.__version__)'
  "$baton" --version
} | tee "$out/machine.txt"

# llama.cpp: llama-cpp-python's server runs one request at a time (no batching across requests)
# and by default a new request interrupts the running one; --interrupt_requests False queues them.
python3 -m llama_cpp.server --model "$model" --n_threads 2 --n_threads_batch 2 --n_ctx 4096 \
  --interrupt_requests False --host 127.0.0.1 --port $llama_port >"${TMPDIR:-/tmp}/llama-server.log" 2>&1 &
children+=($!)
wait_http "http://127.0.0.1:$llama_port" /v1/models
bench llama-cpp "http://127.0.0.1:$llama_port" --extra-body '{"logit_bias":{"0":-100,"2":-100}}'
kill "${children[-1]}"
wait "${children[-1]}" 2>/dev/null || true

run_baton() { # name up-args...
  local name=$1
  shift
  "$baton" up --model "$model" --http 127.0.0.1:$http_port --grpc 127.0.0.1:$grpc_port "$@" \
    >"${TMPDIR:-/tmp}/$name-up.log" 2>&1 &
  children+=($!)
  wait_http "http://127.0.0.1:$http_port" /ready
  bench "$name" "http://127.0.0.1:$http_port" --ignore-eos
  kill -TERM "${children[-1]}"
  wait "${children[-1]}" 2>/dev/null || true
}

run_baton baton-disaggregated --prefill 1 --decode 1
if "$baton" up --help | grep -q -- --colocated; then
  run_baton baton-colocated --colocated
fi

python3 - "$out" <<'EOF' | tee "$out/summary.md"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = []
for f in sorted(out.glob("*-c*/results.json")):
    d = json.load(open(f))
    s = d["runs"][0]["summary"]
    rows.append((f.parent.name, s))
print("| server, streams | ok/sent | output tok/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | ITL p50 (ms) | E2E p50 (ms) | goodput (req/s) | tokens counted from |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for name, s in rows:
    chunks = "chunks" if s.get("output_tokens_from_chunks") else "usage"
    goodput = "-" if s.get("goodput") is None else f"{s['goodput']:.3f}"
    print(f"| {name} | {s['completed']}/{s['sent']} | {s['output_throughput']:.1f} | "
          f"{s['ttft']['median_ms']:.0f} / {s['ttft']['p99_ms']:.0f} | "
          f"{s['tpot']['median_ms']:.1f} / {s['tpot']['p99_ms']:.1f} | {s['itl']['median_ms']:.1f} | "
          f"{s['e2e']['median_ms']:.0f} | {goodput} | {chunks} |")
EOF
