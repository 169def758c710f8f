#!/usr/bin/env python3
"""Summarises rig/bench-scaling.sh output (lines "scaling: {json}") as the Markdown table of
docs/benchmarks.md: per (delay, vCPUs, mode) the median and worst of the overall rate, the
median p50/p99 fault latency, and whether every page verified.
Usage: rig/scaling-table.py < LOG"""
import json, statistics, sys

rows = {}
for line in sys.stdin:
    line = line.strip().replace("\r", "")
    if not line.startswith("scaling: {"):
        continue
    r = json.loads(line[len("scaling: "):])
    name = r["mode"] if r["mode"] != "uffd-missing" else f"uffd-missing, {'1 uffd' if r['uffd'] == 'single' else '1 uffd/vCPU'}"
    if r["mode"] == "vcpu-exit":
        name += f" ({r.get('vcpu_exit_via', '?')})"
    rows.setdefault((r["delay_us"], r["vcpus"], name), []).append(r)

print("| delay | vCPUs | mode | runs | pages/s median | pages/s worst | pages/s/vCPU median | p50 us | p99 us | verified |")
print("|---|---|---|---|---|---|---|---|---|---|")
for (delay, vcpus, name), rs in sorted(rows.items()):
    rates = [r["pages_per_sec"] for r in rs]
    ok = all(r["bad_pages"] == 0 and r["checksum_failures"] == 0 for r in rs)
    print(f"| {delay} | {vcpus} | {name} | {len(rs)} | {statistics.median(rates):.0f} | {min(rates):.0f} | "
          f"{statistics.median([r['pages_per_sec_per_vcpu'] for r in rs]):.0f} | "
          f"{statistics.median([r['latency_us']['p50'] for r in rs]):.1f} | "
          f"{statistics.median([r['latency_us']['p99'] for r in rs]):.1f} | {'all' if ok else 'NO'} |")
