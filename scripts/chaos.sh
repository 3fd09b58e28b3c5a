#!/usr/bin/env bash
# The chaos suite: faults injected into a cluster of real `baton` processes, each scenario one
# result line (`baton-lab chaos`, lab/src/chaos.rs; RELIABILITY.md records the figures).
#
#   scripts/chaos.sh [--short] [--debug] [baton-lab chaos flags ...]
#
#   (full)    every scenario: kill-decode-{push,pull}, kill-prefill-{push,pull},
#             stop-prefill-{push,pull}, restart-coordinator, flood; about 15 minutes on 2 cores.
#             Results in benches/results/chaos-<date>/ (summary.txt, <scenario>.json, logs/).
#   --short   the CI subset: kill-decode-push with 8 streams and kill-prefill-push; about
#             2 minutes. Results in a temporary folder, kept (and named) only when a check fails.
#   --debug   use the debug build (target/debug, what `cargo test` built) instead of building
#             and using the release one.
#
# Other flags go to `baton-lab chaos` (`--scenarios flood --clients 500`, `--out DIR`; see
# `baton-lab chaos --help`). Every wait inside has a deadline; `timeout` here is the backstop
# that stops the whole run (and with it every child: they die with their parent).
#
#   BATON_MODEL   the model (default: scripts/fetch-model.sh's development model)
set -euo pipefail
cd "$(dirname "$0")/.."

short=0
profile=release
args=()
out=
while [[ $# -gt 0 ]]; do
  case $1 in
    --short) short=1 ;;
    --debug) profile=debug ;;
    --out) out=$2; args+=(--out "$2"); shift ;;
    *) args+=("$1") ;;
  esac
  shift
done

if [[ -z ${BATON_MODEL:-} ]]; then
  BATON_MODEL=$(bash scripts/fetch-model.sh)
  export BATON_MODEL
fi
if [[ $profile == release ]]; then
  cargo build --release -p baton -p baton-lab
fi
bin=target/$profile
for exe in baton baton-lab; do
  [[ -x $bin/$exe ]] || { echo "chaos.sh: no $bin/$exe (build it: cargo build -p baton -p baton-lab)" >&2; exit 2; }
done
export BATON_EXE=$PWD/$bin/baton

scratch=
if [[ -z $out ]]; then
  if [[ $short == 1 ]]; then
    scratch=$(mktemp -d "${TMPDIR:-/tmp}/baton-chaos.XXXXXX")
    out=$scratch
  else
    out=benches/results/chaos-$(date +%F)
  fi
  args+=(--out "$out")
fi

limit=1500
flags=()
if [[ $short == 1 ]]; then
  limit=300
  flags+=(--short)
fi
status=0
timeout --kill-after=10 "$limit" "$bin/baton-lab" chaos "${flags[@]}" "${args[@]}" || status=$?
if [[ $status == 124 || $status == 137 ]]; then
  echo "chaos.sh: the run passed its ${limit} s bound and was stopped" >&2
fi
if [[ -n $scratch ]]; then
  if [[ $status == 0 ]]; then
    rm -rf "$scratch"
  else
    echo "chaos.sh: results and logs kept in $scratch" >&2
  fi
else
  echo "results: $out"
fi
exit "$status"
