#!/usr/bin/env bash
# Fuzzes the decoders of bytes a peer or a client sends (fuzz/, one target per decoder):
#
#   scripts/fuzz.sh [SECONDS] [TARGET | light | all ...]
#
# runs each target SECONDS (default 10) under libFuzzer (`cargo +nightly fuzz run`), starting
# from the committed corpus (fuzz/corpus/<target>/) and growing a scratch copy of it, never the
# committed one. A crash, panic or timeout fails the script; libFuzzer leaves the input in
# fuzz/artifacts/<target>/. Targets: kv_frame kv_payload discovery_advert discovery_event
# (`light`: they build in minutes) and proto_worker openai_request config_toml group_frame (which link
# candle and the whole cluster); default `all`.
#
# Fuzzing needs a nightly toolchain (`cargo +nightly`) and cargo-fuzz, which is installed when
# missing. Without nightly the script says so loudly and replays the committed corpus through
# the same target functions on stable (fuzz/tests/corpus.rs, which `cargo test --workspace`
# runs too): a regression check, not fuzzing.
#
#   FUZZ_MODE     fuzz | replay (default: fuzz where nightly exists, else replay)
#   FUZZ_OUT      folder for the grown corpora and logs (default: a temporary one, removed)
#   FUZZ_ARGS     extra libFuzzer flags, e.g. "-max_len=8192"
#   FUZZ_PROFILE  release (default) | dev: an unoptimized build, about half the build time and
#                 a tenth of the executions per second
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=10
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then
  seconds=$1
  shift
fi
light=(kv_frame kv_payload discovery_advert discovery_event)
heavy=(proto_worker openai_request config_toml group_frame)
targets=()
for arg in "${@:-all}"; do
  case $arg in
    light) targets+=("${light[@]}") ;;
    all) targets+=("${light[@]}" "${heavy[@]}") ;;
    *)
      if [[ " ${light[*]} ${heavy[*]} " != *" $arg "* ]]; then
        echo "fuzz.sh: unknown target $arg (known: ${light[*]} ${heavy[*]})" >&2
        exit 2
      fi
      targets+=("$arg")
      ;;
  esac
done
# Light targets alone build without the heavy crates.
features=(--no-default-features --features libfuzzer)
replay_features=(--no-default-features)
for t in "${targets[@]}"; do
  if [[ " ${heavy[*]} " == *" $t "* ]]; then
    features=(--features libfuzzer,heavy)
    replay_features=(--no-default-features --features heavy)
  fi
done

mode=${FUZZ_MODE:-}
why="FUZZ_MODE=replay"
if [[ -z $mode ]]; then
  if cargo +nightly --version >/dev/null 2>&1; then mode=fuzz; else mode=replay; fi
  why="no nightly toolchain (cargo +nightly fails), which libFuzzer needs"
fi

if [[ $mode == replay ]]; then
  cat >&2 <<EOF
################################################################################
fuzz.sh: NOT FUZZING: $why.
Replaying the committed corpus (fuzz/corpus/) through ${targets[*]}
on stable instead: a regression check, no new input explored.
################################################################################
EOF
  exec cargo test -p baton-fuzz "${replay_features[@]}" --test corpus
fi

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "fuzz.sh: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked
fi

out=${FUZZ_OUT:-}
if [[ -z $out ]]; then
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
fi
mkdir -p "$out"

# Overflow checks on (a peer's bytes must not overflow arithmetic either); no sanitizer: the
# decoders are safe Rust, and ASan would double the build and halve the executions.
profile=--release
[[ ${FUZZ_PROFILE:-release} == dev ]] && profile=--dev
build=("$profile" --debug-assertions --sanitizer none "${features[@]}")
started=$(date +%s)
for t in "${targets[@]}"; do
  cargo +nightly fuzz build "${build[@]}" "$t"
done
echo "fuzz.sh: built ${#targets[@]} targets in $(($(date +%s) - started)) s" >&2

summary=()
for t in "${targets[@]}"; do
  mkdir -p "$out/corpus/$t"
  log="$out/$t.log"
  echo "fuzz.sh: $t for ${seconds}s" >&2
  # The grown corpus goes to the scratch folder (libFuzzer writes new inputs to the first).
  # FUZZ_ARGS splits into flags.
  # shellcheck disable=SC2086
  if ! cargo +nightly fuzz run "${build[@]}" "$t" "$out/corpus/$t" "fuzz/corpus/$t" -- \
    -max_total_time="$seconds" -timeout=10 -print_final_stats=1 ${FUZZ_ARGS:-} >"$log" 2>&1; then
    tail -n 60 "$log" >&2
    echo "fuzz.sh: $t FAILED; the input is in fuzz/artifacts/$t/, the log in $log" >&2
    [[ -n ${FUZZ_OUT:-} ]] || trap - EXIT
    exit 1
  fi
  # libFuzzer's last status line: "#RUNS<tab>DONE cov: N ft: N corp: N/SIZE ...".
  done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n 1 || true)
  field() { grep -oE "$1: [0-9]+[^ ]*" <<<"$done_line" | awk '{print $2}' || true; }
  runs=$(grep -oE 'stat::number_of_executed_units: [0-9]+' "$log" | awk '{print $2}' || true)
  cov=$(field cov)
  ft=$(field ft)
  corp=$(field corp)
  summary+=("$(printf '%-18s %12s %7s %7s %14s' "$t" "${runs:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}")")
done

printf '%-18s %12s %7s %7s %14s\n' target executions cov ft corpus >&2
printf '%s\n' "${summary[@]}" >&2
