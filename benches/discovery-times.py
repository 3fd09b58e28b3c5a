#!/usr/bin/env python3
"""How fast the cluster notices a worker come and go, per discovery backend.

    benches/discovery-times.py OUT_DIR [--backend mdns|etcd|both] [--trials 20]

For each backend: a coordinator (discovery on), then TRIALS times: start a `baton decode`
(announcing itself), time from its start to the first request the coordinator serves on it,
then SIGKILL it and time until the coordinator stops routing to it (`baton status` state no
longer `routable`) and, for etcd, until its lease expires and it leaves the list. One decode
worker at a time, so a served request ran on the new one. Writes OUT_DIR/discovery-times.json
and prints median / max per measure. etcd: Debian's etcd-server (`etcd` on PATH), started here
on 127.0.0.1 with a throwaway data dir.

The binary is target/release/baton (build it first: `cargo build --release`).
"""

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATON = os.path.join(ROOT, "target", "release", "baton")
LIMIT = 120.0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(what, check, limit=LIMIT, every=0.02):
    start = time.monotonic()
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() - start > limit:
            raise SystemExit(f"{what}: not within {limit}s")
        time.sleep(every)


def status(grpc):
    out = subprocess.run(
        [BATON, "status", "--coordinator", grpc, "--json"],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        return None
    return json.loads(out.stdout)["workers"]


def serve_one(http):
    body = json.dumps({"prompt": "Hello", "max_tokens": 1, "temperature": 0}).encode()
    req = urllib.request.Request(
        f"http://{http}/v1/completions",
        data=body,
        headers={"content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r)["baton"]["decode_worker"]
    except Exception:
        return None


def start_etcd(tmp):
    client, peer = free_port(), free_port()
    data = os.path.join(tmp, "etcd")
    proc = subprocess.Popen(
        [
            "etcd",
            "--data-dir", data,
            "--listen-client-urls", f"http://127.0.0.1:{client}",
            "--advertise-client-urls", f"http://127.0.0.1:{client}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"default=http://127.0.0.1:{peer}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def healthy():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{client}/health", timeout=1) as r:
                return b"true" in r.read()
        except Exception:
            return False

    wait("etcd up", healthy)
    return proc, f"http://127.0.0.1:{client}"


def run_backend(backend, trials, tmp, log):
    key = os.path.join(tmp, "cluster.key")
    with open(key, "w") as f:
        f.write("discovery-times benchmark key, 32 bytes or more\n")
    cluster = f"dt{os.getpid()}{backend}"
    flags = ["--discovery", backend, "--cluster-key-file", key, "--cluster", cluster]
    etcd = None
    if backend == "etcd":
        etcd, endpoint = start_etcd(tmp)
        flags += ["--etcd-endpoint", endpoint]
    grpc, http = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    coord = subprocess.Popen(
        [BATON, "coordinator", "--grpc", grpc, "--http", http] + flags,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    rows = []
    try:
        for i in range(trials):
            wid = f"dt-{backend}-{i}"
            worker_flags = list(flags)
            if backend == "etcd":
                worker_flags += ["--advertise-host", "127.0.0.1"]
            t0 = time.monotonic()
            worker = subprocess.Popen(
                [BATON, "decode", "--listen", "0.0.0.0:0", "--kv-listen", "0.0.0.0:0",
                 "--no-metrics", "--kv-cache-mib", "64", "--worker-id", wid] + worker_flags,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
            wait(f"{wid} served", lambda: serve_one(http) == wid)
            served = time.monotonic() - t0
            t1 = time.monotonic()
            worker.send_signal(signal.SIGKILL)
            worker.wait()

            def state():
                ws = status(grpc)
                if ws is None:
                    return None
                mine = [w for w in ws if w["worker_id"] == wid]
                return mine[0]["state"] if mine else "gone"

            wait(f"{wid} out of placement", lambda: state() not in (None, "routable"))
            unroutable = time.monotonic() - t1
            gone = None
            if backend == "etcd":
                wait(f"{wid} left", lambda: state() == "gone", every=0.1)
                gone = time.monotonic() - t1
            rows.append({"trial": i, "served_s": served, "unroutable_s": unroutable, "gone_s": gone})
            print(f"{backend} trial {i}: served {served:.2f}s, out of placement {unroutable:.3f}s"
                  + (f", gone {gone:.2f}s" if gone is not None else ""), flush=True)
    finally:
        coord.send_signal(signal.SIGTERM)
        coord.wait()
        if etcd:
            etcd.kill()
            etcd.wait()
    return rows


def summary(rows, field):
    xs = [r[field] for r in rows if r[field] is not None]
    if not xs:
        return None
    return {"median": statistics.median(xs), "max": max(xs), "n": len(xs)}


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    out = sys.argv[1]
    backend = "both"
    trials = 20
    args = sys.argv[2:]
    while args:
        flag = args.pop(0)
        if flag == "--backend":
            backend = args.pop(0)
        elif flag == "--trials":
            trials = int(args.pop(0))
        else:
            raise SystemExit(f"unknown flag {flag}")
    backends = ["mdns", "etcd"] if backend == "both" else [backend]
    if "etcd" in backends and not shutil.which("etcd"):
        raise SystemExit("etcd is not on PATH (apt-get install etcd-server)")
    os.makedirs(out, exist_ok=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp, open(os.path.join(out, "logs.txt"), "w") as log:
        for b in backends:
            rows = run_backend(b, trials, tmp, log)
            results[b] = {
                "trials": rows,
                "served_s": summary(rows, "served_s"),
                "unroutable_s": summary(rows, "unroutable_s"),
                "gone_s": summary(rows, "gone_s"),
            }
    with open(os.path.join(out, "discovery-times.json"), "w") as f:
        json.dump(results, f, indent=2)
    for b, r in results.items():
        for k in ("served_s", "unroutable_s", "gone_s"):
            if r[k]:
                print(f"{b:5} {k:13} median {r[k]['median']:.3f}s  max {r[k]['max']:.3f}s  (n={r[k]['n']})")


if __name__ == "__main__":
    main()
