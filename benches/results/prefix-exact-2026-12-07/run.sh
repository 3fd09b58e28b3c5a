#!/usr/bin/env bash
# Prefill throughput before (matmul attention over the chunk, padded to a multiple of 64 keys)
# and after (per-row paged attention) the fix, alternated: OLD is baton-lab built from the
# commit before it (git worktree, same lab flags), NEW the current one.
#   run.sh OLD_BATON_LAB NEW_BATON_LAB OUT_DIR ROUNDS
set -euo pipefail
old=$1 new=$2 out=$3 rounds=${4:-3}
mkdir -p "$out"
args=(engine --baseline none --batch-sizes 1 --paired-rounds 0 --decode-tokens 8 --repeats 3
      --prefill-lengths 128,512,2048 --json)
for r in $(seq 1 "$rounds"); do
  "$old" "${args[@]}" > "$out/old-$r.json"
  "$new" "${args[@]}" > "$out/new-$r.json"
done
python3 - "$out" "$rounds" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
for n in ["128", "512", "2048"]:
    o = [json.load(open(f"{out}/old-{r}.json"))["prefill_tok_s"][n] for r in range(1, rounds + 1)]
    w = [json.load(open(f"{out}/new-{r}.json"))["prefill_tok_s"][n] for r in range(1, rounds + 1)]
    print(f"prefill {n:>5}: old {statistics.median(o):7.1f} tok/s, new {statistics.median(w):7.1f} tok/s, new/old {statistics.median(w)/statistics.median(o):.3f}  (per round: {', '.join(f'{b/a:.3f}' for a, b in zip(o, w))})")
PY
