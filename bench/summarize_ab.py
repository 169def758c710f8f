#!/usr/bin/env python3
"""Reads alternating old/new `demo --json` lines, each after a line 'BUILD old|new', and prints
per fault mode the medians of each build and the median of the paired new/old ratios."""
import json
import statistics
import sys

runs = {}
build = None
for line in sys.stdin:
    line = line.strip()
    if line.startswith("BUILD"):
        build = line.split()[1]
        continue
    if line.startswith("{"):
        d = json.loads(line)
        runs.setdefault(d["fault_mode"], {}).setdefault(build, []).append(d)

def total_ratio(d):
    return d["total_seconds"] / d["tcp_baseline_seconds"]

print("| fault mode | build | total s | total / TCP copy | downtime ms | fault p99 us | digest and guest check |")
print("|---|---|---|---|---|---|---|")
for mode, by in runs.items():
    for b in ("old", "new"):
        rs = by.get(b, [])
        if not rs:
            continue
        med = lambda f: statistics.median(f(r) for r in rs)
        worst = lambda f: max(f(r) for r in rs)
        ok = sum(1 for r in rs if r["digest_match"] and r["guest_check"])
        print(f'| {mode} | {b} | {med(lambda r: r["total_seconds"]):.2f} ({worst(lambda r: r["total_seconds"]):.2f}) | '
              f'{med(total_ratio):.2f} ({worst(total_ratio):.2f}) | {med(lambda r: r["downtime_ms"]):.1f} | '
              f'{med(lambda r: r["fault_latency_us"]["p99"]):.0f} ({worst(lambda r: r["fault_latency_us"]["p99"]):.0f}) | {ok} of {len(rs)} |')
    pairs = list(zip(by.get("old", []), by.get("new", [])))
    if pairs:
        ratio = statistics.median(n["total_seconds"] / o["total_seconds"] for o, n in pairs)
        print(f"| {mode} | new/old, paired | {ratio:.2f} | | | | |")
