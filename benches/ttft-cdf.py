#!/usr/bin/env python3
"""TTFT distribution of every run in a results folder, as one SVG chart (no plotting library).

    benches/ttft-cdf.py OUT_DIR [TITLE]

Reads OUT_DIR/*/results.json (`baton bench serve --out`), skips warm-up runs, and writes
OUT_DIR/ttft_cdf.svg: for each run, the share of requests whose time to first token is at most
x, x on a log scale from 100 ms to the slowest request.
"""
import json
import math
import pathlib
import sys

out = pathlib.Path(sys.argv[1])
title = sys.argv[2] if len(sys.argv) > 2 else out.name
runs = []
for f in sorted(out.glob("*/results.json")):
    if f.parent.name.endswith("-warmup"):
        continue
    samples = json.load(open(f))["runs"][0]["samples"]
    ttfts = sorted(s["ttft_s"] for s in samples if s.get("error") is None and s.get("ttft_s"))
    if ttfts:
        runs.append((f.parent.name, ttfts))
if not runs:
    sys.exit(f"no results.json under {out}")

W, H, L, R, T, B = 760, 420, 60, 220, 40, 50
lo = 0.1
hi = max(t[-1] for _, t in runs) * 1.1
x = lambda v: L + (math.log10(max(v, lo)) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * (W - L - R)
y = lambda p: H - B - p * (H - T - B)
colors = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666"]
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
       f'<rect width="{W}" height="{H}" fill="white"/>',
       f'<text x="{L}" y="20" font-size="14">{title}: time to first token, share of requests at or below</text>',
       f'<line x1="{L}" y1="{y(0)}" x2="{W - R}" y2="{y(0)}" stroke="black"/>',
       f'<line x1="{L}" y1="{y(0)}" x2="{L}" y2="{y(1)}" stroke="black"/>']
tick = 0.1
while tick <= hi:
    for m in (1, 2, 5):
        v = tick * m
        if lo <= v <= hi:
            svg.append(f'<line x1="{x(v):.1f}" y1="{y(0)}" x2="{x(v):.1f}" y2="{y(1)}" stroke="#ddd"/>')
            svg.append(f'<text x="{x(v):.1f}" y="{y(0) + 16}" text-anchor="middle">{v:g} s</text>')
    tick *= 10
for p in (0.0, 0.5, 0.9, 1.0):
    svg.append(f'<text x="{L - 6}" y="{y(p) + 4:.1f}" text-anchor="end">{p:g}</text>')
for i, (name, ttfts) in enumerate(runs):
    c = colors[i % len(colors)]
    n = len(ttfts)
    pts = [(x(ttfts[0]), y(0))]
    for k, t in enumerate(ttfts):
        pts += [(x(t), y(k / n)), (x(t), y((k + 1) / n))]
    svg.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="' + " ".join(f"{a:.1f},{b:.1f}" for a, b in pts) + '"/>')
    p50 = ttfts[n // 2] * 1000
    svg.append(f'<text x="{W - R + 10}" y="{T + 20 + 18 * i}" fill="{c}">{name} (p50 {p50:.0f} ms)</text>')
svg.append("</svg>")
(out / "ttft_cdf.svg").write_text("\n".join(svg))
print(out / "ttft_cdf.svg")
