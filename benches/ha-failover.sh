#!/usr/bin/env bash
# Coordinator failover with real processes: runs cli/tests/ha.rs (three coordinators in one raft
# group, a real etcd, a second baton as the cloud; the leader SIGKILLed under load) N times and
# keeps each trial's "HA:" line (election time, first budget decision after it, requests failed,
# latencies) in OUT/trials.txt.
#
#   benches/ha-failover.sh [N=10] [OUT=benches/results/ha-failover-$(date +%F)]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-10}
out=${2:-benches/results/ha-failover-$(date +%F)}
mkdir -p "$out"
cargo test -p baton --test ha --no-run 2>/dev/null
{ uname -srm; grep -m1 'model name' /proc/cpuinfo; nproc; git rev-parse --short HEAD; } > "$out/machine.txt"
: > "$out/trials.txt"
for i in $(seq 1 "$n"); do
  cargo test -q -p baton --test ha -- --nocapture 2>&1 | grep '^HA:' | tee -a "$out/trials.txt"
done
python3 - "$out/trials.txt" <<'PY'
import sys, statistics
rows = [dict(kv.split("=") for kv in line.split()[1:]) for line in open(sys.argv[1])]
def col(k): return sorted(int(r[k]) for r in rows if k in r)
print(f"trials {len(rows)}, requests {sum(int(r['requests']) for r in rows)}, failed {sum(int(r['failed']) for r in rows)}")
for k in ["elected_ms", "first_decision_ms", "first_cloud_sent_after_kill_answered_ms", "cloud_p50_before_ms", "cloud_slowest_after_kill_ms"]:
    v = col(k)
    if v:
        print(f"{k}: p50 {statistics.median(v):.0f}, p90 {v[int(0.9 * (len(v) - 1))]}, max {v[-1]}")
PY
