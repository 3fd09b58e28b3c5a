"""Pairs handoff.stderr's requests by (length, config, repeat) across the two builds and prints
after - before TTFT per configuration, and the pull reads' medians. Run: python3 paired.py"""
import re, statistics as st, collections
rows=collections.defaultdict(dict)
for line in open('handoff.stderr'):
    m=re.match(r'\s*(\d+) tokens\s+(after|before)\s+(\S+(?: \S+)?)\s+#(\d+)\s+ttft\s+([\d.]+) ms\s+2nd\s+([\d.]+) ms.*transfer\s+([\d.]+) ms\s+exposed\s+([\d.]+) ms',line)
    if not m: continue
    n,build,cfg,rep,ttft,sec,tr,ex=m.groups()
    rows[(int(n),cfg.strip(),int(rep))][build]=(float(ttft),float(sec),float(tr),float(ex))
print("paired after - before, per request (same prompt, sent to both builds back to back); median [min..max] ms")
print(f"{'prompt':>6} {'config':<11} {'n':>2} {'TTFT after-before':>28} {'pull read after / before (median ms)':>38}")
agg=collections.defaultdict(list); tr=collections.defaultdict(lambda: ([],[]))
for (n,cfg,rep),v in sorted(rows.items()):
    if 'after' in v and 'before' in v:
        agg[(n,cfg)].append(v['after'][0]-v['before'][0])
        tr[(n,cfg)][0].append(v['after'][2]); tr[(n,cfg)][1].append(v['before'][2])
order=['aggregated','tcp push','tcp pull','shm push','shm pull']
for n in sorted({k[0] for k in agg}):
    for cfg in order:
        d=agg.get((n,cfg))
        if not d: continue
        extra=''
        if 'pull' in cfg:
            a,b=tr[(n,cfg)]; extra=f"{st.median(a):8.1f} / {st.median(b):8.1f}"
        print(f"{n:>6} {cfg:<11} {len(d):>2} {st.median(d):+10.1f} [{min(d):+8.1f}..{max(d):+8.1f}] {extra:>38}")
