# Shared by the scripts that run baton and llama-server one after the other
# (compare-llama-cpp.sh, chat-routing.sh); sourced, not run. Needs `out` (the output folder)
# set; sets `root`, `baton`, `model`, `llama_server`, the ports, and a trap that stops every
# child in `children` on exit.

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
baton=${BATON:-$root/target/release/baton}
model=$("$root/scripts/fetch-model.sh")
llama_server=${LLAMA_SERVER:-$("$root/scripts/build-llama-cpp.sh")/llama-server}
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

machine_info() { # what ran where, for OUT/machine.txt
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(nproc) cores"
  echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "llama-server: $llama_server ($("$llama_server" --version 2>&1 | grep -m1 version || true)), -t 2 -tb 2 -c 16384 -np 8 --no-repack (AMX faults in this VM; for Q4_1 it is the only extra buffer type)"
  "$baton" --version
}
