#!/usr/bin/env bash
# The engine against llama.cpp's own C++ benchmark: `baton-lab engine` (baton's engine in
# process, no serving) and `llama-bench` on the same GGUF with the same thread count,
# alternated round by round so both see the same machine; ratios are baton / llama.cpp per
# round, and the medians of the rounds.
#
#   benches/engine-vs-llama-bench.sh [OUT] [ROUNDS]     # default OUT benches/results/engine-vs-llama-bench-<date>, 3 rounds
#
# Figures: prefill of a 128- and a 512-token prompt (llama-bench pp128, pp512) and single-stream
# decode of 64 tokens (tg64), tokens per second. llama-bench: `-t 2 -p 128,512 -n 64 -r 3
# --repack 0`; baton-lab: `--repeats 3`. Both sides' figure is the best of their 3 repetitions
# (baton-lab's convention; llama-bench's `samples_ts`, whose mean it prints as `avg_ts`, is in
# the JSON). `--repack 0`: llama.cpp's extra buffer
# types off; this VM's CPU advertises AMX but faults on its first tile instruction (SIGILL in
# ggml's AMX kernel), and for this Q4_1 model AMX is the only extra buffer type that applies.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-$root/benches/results/engine-vs-llama-bench-$(date -u +%Y-%m-%d)}
rounds=${2:-3}
threads=${THREADS:-2}
mkdir -p "$out"
model=$("$root/scripts/fetch-model.sh")
llama_bench=${LLAMA_BENCH:-$("$root/scripts/build-llama-cpp.sh" 0.3.36)/llama-bench}
lab=${BATON_LAB:-$root/target/release/baton-lab}
[[ -x $lab ]] || (cd "$root" && cargo build --release -p baton-lab >&2)

{
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(nproc) cores"
  echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "llama-bench: $llama_bench ($(cat "$(dirname "$llama_bench")/../VERSION" 2>/dev/null || echo '?')), -t $threads -p 128,512 -n 64 -r 3 --repack 0"
  echo "baton: $(git -C "$root" rev-parse --short HEAD), baton-lab engine --baseline none --repeats 3 --decode-tokens 64 --batch-sizes 1 --paired-rounds 0"
  echo "model: $model"
} | tee "$out/machine.txt"

for r in $(seq 1 "$rounds"); do
  echo "round $r: llama-bench" >&2
  "$llama_bench" -m "$model" -t "$threads" -p 128,512 -n 64 -r 3 --repack 0 -o json >"$out/llama-bench-$r.json"
  echo "round $r: baton-lab engine" >&2
  "$lab" engine --model "$model" --baseline none --json --repeats 3 \
    --decode-tokens 64 --batch-sizes 1 --paired-rounds 0 >"$out/baton-$r.json"
done

python3 - "$out" "$rounds" <<'PY' | tee "$out/summary.txt"
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
rows = {"prefill 128": [], "prefill 512": [], "decode (tg64)": []}
for r in range(1, rounds + 1):
    llama = json.load(open(f"{out}/llama-bench-{r}.json"))
    def peer(p, n):
        t = next(t for t in llama if t["n_prompt"] == p and t["n_gen"] == n)
        return max(t["samples_ts"])
    b = json.loads(open(f"{out}/baton-{r}.json").read().strip().splitlines()[-1])
    pairs = {
        "prefill 128": (b["prefill_tok_s"]["128"], peer(128, 0)),
        "prefill 512": (b["prefill_tok_s"]["512"], peer(512, 0)),
        "decode (tg64)": (b["decode_tok_s"], peer(0, 64)),
    }
    for k, (ours, theirs) in pairs.items():
        rows[k].append((ours, theirs, ours / theirs))
print(f"{'figure':<16} {'baton tok/s':>24} {'llama-bench tok/s':>24} {'ratio per round':>24} {'median':>7}")
for k, v in rows.items():
    fmt = lambda xs: ", ".join(f"{x:.0f}" for x in xs)
    ratios = [x[2] for x in v]
    print(f"{k:<16} {fmt([x[0] for x in v]):>24} {fmt([x[1] for x in v]):>24} "
          f"{', '.join(f'{x:.2f}' for x in ratios):>24} {statistics.median(ratios):>6.2f}x")
PY
