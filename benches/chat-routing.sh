#!/usr/bin/env bash
# Issue 20's measurement: the multi-turn chat workload against baton with its prefix cache off,
# on with load-only routing, and on with KV-aware routing (2 prefill + 2 decode workers, and
# 1 + 1 for reference), and llama.cpp's C++ llama-server (-np 8, prompt cache on) through the
# same load generator, one server at a time, in one invocation.
#
#   benches/chat-routing.sh OUT_DIR [cold|warm]
#
# cold (default): every server starts fresh, so the chat's first turns meet an empty cache.
# warm: each server first serves 16 unmeasured requests of a 1024-token shared prompt (4 at a
# time), whose first 512 tokens are the chat's system prompt (the generator draws both from the
# same seed), so llama-server's slots and baton's pools hold it; only llama-server, baton 1 + 1
# (decode workers at `up`'s default nice 10, and at 0) and baton 2 + 2 with KV-aware routing
# run then.
#
# Workload (as in compare-llama-cpp.sh's chat): 8 conversations arriving at 0.5/s (Poisson),
# 4 turns each; every turn's prompt = a 512-token system prompt + the conversation so far (the
# server's own answers included) + a 48-token message; 48-token answers; 1 s mean think time;
# seeded; greedy; end tokens ignored. SLO for goodput: TTFT 1 s, TPOT 100 ms.
#
# Besides the load generator's figures, each baton run scrapes its processes' metrics when the
# run ends: prompt tokens the prefill workers computed (baton_prefill_tokens_total), KV bytes
# the handoffs moved and those the decode workers' caches spared
# (baton_kv_transfer_bytes_total, baton_kv_transfer_bytes_cached_total on the coordinator).
# Needs a release build ($BATON overrides the binary) and llama-server ($LLAMA_SERVER, else
# built by scripts/build-llama-cpp.sh).
set -euo pipefail

out=${1:?usage: $0 OUT_DIR [cold|warm]}
mode=${2:-cold}
[[ $mode == cold || $mode == warm ]] || { echo "mode must be cold or warm" >&2; exit 2; }
# shellcheck source=benches/peer-common.sh
. "$(dirname "$0")/peer-common.sh"
logs=${TMPDIR:-/tmp}

warmup() { # name endpoint: in warm mode, the unmeasured shared-prompt requests
  [[ $mode == warm ]] || return 0
  "$baton" bench serve --endpoint "$2" --concurrency 4 --seed 7 --tokenizer "$model" \
    --no-progress --ignore-eos --num-requests 16 --shared-prefix-len 1024 --input-len 64 \
    --output-len 32 --out "$out/$1-warmup" >"$out/$1-warmup.txt"
}

chat() { # name endpoint
  "$baton" bench serve --endpoint "$2" --rate 0.5 --seed 7 --tokenizer "$model" \
    --no-progress --ignore-eos --slo ttft=1s,tpot=100ms \
    --conversations 8 --turns 4 --shared-prefix-len 512 --input-len 48 --output-len 48 \
    --think-time 1s --out "$out/$1" | tee "$out/$1.txt"
}

sum_metric() { # metric urls...: the sum of an unlabelled counter over the pages
  local metric=$1
  shift
  for url in "$@"; do curl -sf "$url"; done | awk -v m="$metric" '$1 == m {t += $2} END {printf "%.0f\n", t}'
}

machine_info | tee "$out/machine.txt"

"$llama_server" -m "$model" -t 2 -tb 2 -c 16384 -np 8 --no-repack --host 127.0.0.1 --port $llama_port \
  >"$logs/llama-server.log" 2>&1 &
children+=($!)
wait_http "http://127.0.0.1:$llama_port" /health
warmup llama-server "http://127.0.0.1:$llama_port"
chat llama-server "http://127.0.0.1:$llama_port"
kill "${children[-1]}"
wait "${children[-1]}" 2>/dev/null || true

run_baton() { # name up-args...
  local name=$1
  shift
  "$baton" up --model "$model" --http 127.0.0.1:$http_port --grpc 127.0.0.1:$grpc_port "$@" \
    >"$logs/$name-up.log" 2>&1 &
  children+=($!)
  wait_http "http://127.0.0.1:$http_port" /ready
  # The workers' metrics addresses are printed after readiness, the banner's last line last.
  for _ in $(seq 1 300); do grep -q "Ctrl-C stops the cluster" "$logs/$name-up.log" && break; sleep 0.1; done
  warmup "$name" "http://127.0.0.1:$http_port"
  local coordinator="http://127.0.0.1:$http_port/metrics"
  mapfile -t prefill < <(awk '/prefill-[0-9]+ +metrics/ {print $3}' "$logs/$name-up.log")
  local counters=(baton_prefill_tokens_total baton_kv_transfer_bytes_total
    baton_kv_transfer_bytes_cached_total)
  local before=("$(sum_metric "${counters[0]}" "${prefill[@]}")"
    "$(sum_metric "${counters[1]}" "$coordinator")" "$(sum_metric "${counters[2]}" "$coordinator")")
  chat "$name" "http://127.0.0.1:$http_port"
  # The chat's own share: counters after it less before it (the warm-up's).
  {
    echo "prefill_tokens_computed $(($(sum_metric "${counters[0]}" "${prefill[@]}") - before[0]))"
    echo "kv_bytes_moved $(($(sum_metric "${counters[1]}" "$coordinator") - before[1]))"
    echo "kv_bytes_cached $(($(sum_metric "${counters[2]}" "$coordinator") - before[2]))"
  } | tee "$out/$name/cluster.txt"
  kill -TERM "${children[-1]}"
  wait "${children[-1]}" 2>/dev/null || true
}

off=(--set prefill.engine.prefix_cache=false --set decode.engine.prefix_cache=false)
if [[ $mode == cold ]]; then
  run_baton baton-2p2d-nocache --prefill 2 --decode 2 "${off[@]}"
  run_baton baton-2p2d-load --prefill 2 --decode 2 --set coordinator.routing=load
fi
run_baton baton-2p2d-kv --prefill 2 --decode 2 --set coordinator.routing=kv
run_baton baton-1p1d-kv --prefill 1 --decode 1 --set coordinator.routing=kv
# `up` runs decode workers at nice 10 next to prefill workers; this is the same without.
run_baton baton-1p1d-kv-nice0 --prefill 1 --decode 1 --set coordinator.routing=kv --decode-nice 0

python3 - "$out" <<'PY' | tee "$out/summary.md"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print("| server | ok/sent | TTFT p50 / p99 (ms) | TPOT p50 (ms) | output tok/s | goodput (req/s) | prefill tokens computed | KV MiB moved | KV MiB not moved (decode cache) |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for f in sorted(out.glob("*/results.json")):
    if f.parent.name.endswith("-warmup"):
        continue
    s = json.load(open(f))["runs"][0]["summary"]
    c = {}
    cf = f.parent / "cluster.txt"
    if cf.exists():
        c = dict(l.split() for l in cf.read_text().splitlines() if l.strip())
    mib = lambda k: f"{int(c[k]) / 2**20:.1f}" if k in c else "-"
    goodput = "-" if s.get("goodput") is None else f"{s['goodput']:.3f}"
    print(f"| {f.parent.name} | {s['completed']}/{s['sent']} | "
          f"{s['ttft']['median_ms']:.0f} / {s['ttft']['p99_ms']:.0f} | {s['tpot']['median_ms']:.1f} | "
          f"{s['output_throughput']:.1f} | {goodput} | {c.get('prefill_tokens_computed', '-')} | "
          f"{mib('kv_bytes_moved')} | {mib('kv_bytes_cached')} |")
PY
python3 "$root/benches/ttft-cdf.py" "$out" "chat, $mode"
