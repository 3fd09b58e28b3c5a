#!/usr/bin/env bash
# Two builds of baton under the same load, alternated A B A B ... so the machine's drift falls on
# both alike: each round starts a fresh `baton up` from one build and measures it with the NEW
# build's `baton bench serve` (one stream, 128-token prompts, 128 tokens out, EOS ignored).
#
#   benches/ab-builds.sh BASE_BINARY NEW_BINARY OUT_DIR [ROUNDS] [UP_ARGS...]
#
# UP_ARGS default to `--colocated`. Writes OUT_DIR/<a|b>-<round>/{results.json,*.svg} and a
# table of every run (OUT_DIR/summary.md): TTFT, TPOT and ITL percentiles per run.
set -euo pipefail

base=${1:?usage: $0 BASE_BINARY NEW_BINARY OUT_DIR [ROUNDS] [UP_ARGS...]}
new=${2:?usage: $0 BASE_BINARY NEW_BINARY OUT_DIR [ROUNDS] [UP_ARGS...]}
out=${3:?usage: $0 BASE_BINARY NEW_BINARY OUT_DIR [ROUNDS] [UP_ARGS...]}
rounds=${4:-2}
shift $(($# < 4 ? $# : 4))
up_args=("$@")
[ ${#up_args[@]} -eq 0 ] && up_args=(--colocated)
root=$(cd "$(dirname "$0")/.." && pwd)
model=$("$root/scripts/fetch-model.sh")
mkdir -p "$out"
out=$(cd "$out" && pwd)
http_port=18081
grpc_port=18052

up=""
cleanup() {
  [ -n "$up" ] && kill -TERM "$up" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT

{
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(nproc) cores"
  echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "a: $base ($(sha256sum "$base" | cut -c1-12))"
  echo "b: $new ($(sha256sum "$new" | cut -c1-12))"
  echo "up: ${up_args[*]}"
} | tee "$out/machine.txt"

for round in $(seq 1 "$rounds"); do
  for side in a b; do
    binary=$base
    [ "$side" = b ] && binary=$new
    # `up` prints "baton is up" once the coordinator is ready; everything before is start-up.
    # A new file each time: an old one could already hold that line.
    log=$(mktemp "${TMPDIR:-/tmp}/ab-$side-$round-up.XXXXXX")
    "$binary" up --model "$model" --http 127.0.0.1:$http_port --grpc 127.0.0.1:$grpc_port \
      "${up_args[@]}" >"$log" 2>&1 &
    up=$!
    until grep -q "baton is up" "$log"; do
      kill -0 "$up" 2>/dev/null || { echo "baton up ($side) exited" >&2; exit 1; }
      sleep 0.2
    done
    "$new" bench serve --endpoint "http://127.0.0.1:$http_port" --concurrency 1 \
      --num-requests 16 --input-len 128 --output-len 128 --seed 7 --tokenizer "$model" \
      --ignore-eos --no-progress --out "$out/$side-$round" | tee "$out/$side-$round.txt"
    kill -TERM "$up"
    wait "$up" 2>/dev/null || true
    up=""
  done
done

python3 - "$out" <<'EOF' | tee "$out/summary.md"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print("| run | ok/sent | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | ITL p50 / p90 / p99 / max (ms) |")
print("| --- | --- | --- | --- | --- |")
for f in sorted(out.glob("*-*/results.json")):
    s = json.load(open(f))["runs"][0]["summary"]
    t, p, i = s["ttft"], s["tpot"], s["itl"]
    print(f"| {f.parent.name} | {s['completed']}/{s['sent']} "
          f"| {t['median_ms']:.0f} / {t['p99_ms']:.0f} "
          f"| {p['median_ms']:.1f} / {p['p99_ms']:.1f} "
          f"| {i['median_ms']:.1f} / {i['p90_ms']:.1f} / {i['p99_ms']:.1f} / {i['max_ms']:.1f} |")
EOF
