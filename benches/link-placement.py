#!/usr/bin/env python3
"""Disaggregation by measured link speed, on a throttled link.

    benches/link-placement.py OUT_DIR [--rate 40mbit] [--requests 12] [--prompt-words 450]

Needs root (network namespaces, tc). Two hosts on one bridge: a prefill worker on host 1 whose
link is limited with `tc qdisc ... tbf rate RATE` (what leaves host 1, the KV, goes at most that
fast), a decode worker on host 2, the coordinator in this namespace. The same workload runs
under three policies, request by request in rotation so the machine's drift falls on all:
`auto` (the coordinator's measured-bandwidth decision), `force` (always disaggregate) and `off`
(never: the decode worker prefills). Every prompt is distinct from its first block, so no
prefix cache helps. Writes OUT_DIR/link-placement.json and prints TTFT and time to the second
token (p50/p99) per policy, and what `auto` chose. Under push the prefill worker's first token
returns before the KV has crossed the link, so a slow link shows at the second token.

The binary is target/release/baton (`cargo build --release`).
"""

import json
import os
import random
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
WORDS = ("the river runs past old stone walls where children play and merchants call out "
         "their prices while the bells of the tower ring over a quiet town in late summer").split()


def sh(*args):
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


class Lan:
    """A bridge in its own namespace, this namespace as host 0, hosts 1..n as namespaces."""

    def __init__(self, hosts):
        tag = f"{os.getpid() % 0xffff:x}"
        self.subnet = 200 + os.getpid() % 50
        self.switch = f"lsw{tag}"
        self.hosts = []
        self.local = f"ll{tag}0"
        sh("ip", "netns", "add", self.switch)
        sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        sh("ip", "-n", self.switch, "link", "set", "br0", "up")
        for i in range(hosts + 1):
            here, there = f"ll{tag}{i}", f"lp{tag}{i}"
            sh("ip", "link", "add", here, "type", "veth", "peer", "name", there)
            sh("ip", "link", "set", there, "netns", self.switch)
            sh("ip", "-n", self.switch, "link", "set", there, "master", "br0", "up")
            addr = f"{self.addr(i)}/24"
            if i == 0:
                sh("ip", "addr", "add", addr, "dev", here)
                sh("ip", "link", "set", here, "up")
                continue
            ns = f"lh{tag}{i}"
            sh("ip", "netns", "add", ns)
            self.hosts.append((ns, here))
            sh("ip", "link", "set", here, "netns", ns)
            sh("ip", "-n", ns, "addr", "add", addr, "dev", here)
            sh("ip", "-n", ns, "link", "set", here, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")

    def addr(self, i):
        return f"10.{self.subnet}.0.{i + 1}"

    def exec(self, i):
        return ["ip", "netns", "exec", self.hosts[i - 1][0]]

    def limit(self, i, rate):
        ns, dev = self.hosts[i - 1]
        sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
           "rate", rate, "burst", "64kb", "latency", "400ms")

    def close(self):
        subprocess.run(["ip", "link", "del", self.local], stderr=subprocess.DEVNULL)
        for ns, _ in self.hosts:
            subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)
        subprocess.run(["ip", "netns", "del", self.switch], stderr=subprocess.DEVNULL)


def start(cmd, log):
    """Starts a baton process; returns it and the addresses of its `listening` lines."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    return proc


def listening(proc, n, limit=120):
    addrs = []
    deadline = time.monotonic() + limit
    while len(addrs) < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"{proc.args}: no listening line")
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"{proc.args} exited")
        if line.startswith("listening "):
            addrs.append(line.strip().split("=", 1)[1])
    return addrs


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ready(http):
    try:
        with urllib.request.urlopen(f"http://{http}/ready", timeout=2) as r:
            return r.status == 200
    except Exception:
        return False


def request(http, prompt, pd_mode):
    body = json.dumps({"prompt": prompt, "max_tokens": 4, "temperature": 0, "stream": True,
                       "pd_mode": pd_mode}).encode()
    req = urllib.request.Request(f"http://{http}/v1/completions", data=body,
                                 headers={"content-type": "application/json"})
    t0 = time.monotonic()
    tokens = []
    baton = None
    with urllib.request.urlopen(req, timeout=300) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if any(c.get("text") for c in chunk.get("choices", [])):
                tokens.append(time.monotonic() - t0)
            if "baton" in chunk:
                baton = chunk["baton"]
    e2e = time.monotonic() - t0
    # Under push the prefill worker's first token comes back before the KV has crossed the
    # link: a slow link shows at the second token.
    return (tokens[0] if tokens else None, tokens[1] if len(tokens) > 1 else None, e2e), baton


def prompt(i, words):
    rng = random.Random(i)
    return f"Request {i}: " + " ".join(rng.choice(WORDS) for _ in range(words))


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    out = sys.argv[1]
    args = sys.argv[2:]
    rate, n, words = "40mbit", 12, 450
    while args:
        flag = args.pop(0)
        if flag == "--rate":
            rate = args.pop(0)
        elif flag == "--requests":
            n = int(args.pop(0))
        elif flag == "--prompt-words":
            words = int(args.pop(0))
        else:
            raise SystemExit(f"unknown flag {flag}")
    os.makedirs(out, exist_ok=True)
    lan = Lan(2)
    procs = []
    log = open(os.path.join(out, "logs.txt"), "w")
    try:
        if rate != "none":
            lan.limit(1, rate)
        common = ["--listen", "0.0.0.0:50070", "--kv-listen", "0.0.0.0:0", "--no-metrics",
                  "--kv-cache-mib", "512"]
        prefill = start(lan.exec(1) + [BATON, "prefill", "--worker-id", "prefill-h1",
                                        "--set", "prefill.host_id=host-1"] + common, log)
        decode = start(lan.exec(2) + [BATON, "decode", "--worker-id", "decode-h2",
                                       "--set", "decode.host_id=host-2"] + common, log)
        procs += [prefill, decode]
        listening(prefill, 1)
        listening(decode, 1)
        http = f"{lan.addr(0)}:{free_port()}"
        coord = start([BATON, "coordinator", "--grpc", f"{lan.addr(0)}:0", "--http", http,
                       # The test LAN is this machine's own namespaces: no API keys.
                       "--set", "coordinator.auth.insecure_remote=true",
                       "--prefill-worker", f"{lan.addr(1)}:50070",
                       "--decode-worker", f"{lan.addr(2)}:50070"], log)
        procs.append(coord)
        listening(coord, 2)
        deadline = time.monotonic() + 120
        while not ready(http):
            if time.monotonic() > deadline:
                raise SystemExit("coordinator not ready")
            time.sleep(0.2)
        # Warm-up: both workers' first requests, and a transfer to measure the link by.
        for i in range(2):
            request(http, prompt(10_000 + i, words), "force")
            request(http, prompt(20_000 + i, words), "off")
        rows = []
        policies = ["auto", "force", "off"]
        for i in range(n):
            for k in range(len(policies)):
                policy = policies[(i + k) % len(policies)]
                (ttft, second, e2e), baton = request(http, prompt(i * 10 + k, words), policy)
                rows.append({"request": i, "policy": policy, "ttft_s": ttft,
                             "second_token_s": second, "e2e_s": e2e,
                             "mode": baton.get("mode") if baton else None,
                             "reason": baton.get("placement_reason") if baton else None,
                             "predicted_transfer_s": baton.get("predicted_transfer_seconds") if baton else None,
                             "predicted_prefill_s": baton.get("predicted_prefill_seconds") if baton else None,
                             "kv_exposed_s": baton.get("kv_exposed_seconds") if baton else None})
                print(json.dumps(rows[-1]), flush=True)
        summary = {}
        for policy in policies:
            t = [r["ttft_s"] for r in rows if r["policy"] == policy and r["ttft_s"] is not None]
            t2 = [r["second_token_s"] for r in rows
                  if r["policy"] == policy and r["second_token_s"] is not None]
            modes = [r["mode"] for r in rows if r["policy"] == policy]
            summary[policy] = {"n": len(t), "ttft_p50_s": statistics.median(t),
                               "ttft_p99_s": pct(t, 0.99),
                               "second_token_p50_s": statistics.median(t2),
                               "second_token_p99_s": pct(t2, 0.99),
                               "aggregated": modes.count("aggregated"),
                               "disaggregated": modes.count("disaggregated")}
        with open(os.path.join(out, "link-placement.json"), "w") as f:
            json.dump({"rate": rate, "prompt_words": words, "rows": rows, "summary": summary},
                      f, indent=2)
        for policy, s in summary.items():
            print(f"{policy:5}  TTFT p50 {s['ttft_p50_s']:.2f}s  p99 {s['ttft_p99_s']:.2f}s  "
                  f"second token p50 {s['second_token_p50_s']:.2f}s  p99 {s['second_token_p99_s']:.2f}s  "
                  f"aggregated {s['aggregated']}  disaggregated {s['disaggregated']}  (n={s['n']})")
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=40)
            except subprocess.TimeoutExpired:
                p.kill()
        lan.close()


if __name__ == "__main__":
    main()
