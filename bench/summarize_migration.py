#!/usr/bin/env python3
"""Medians of bench/migration.sh output (JSON lines on stdin), per fault mode; with FLOOR=1
lines, also the fresh-memory floor (bench/floor) and each mode's total over it."""
import json, statistics, sys
rows = [json.loads(l) for l in sys.stdin if l.startswith("{")]
floor = {}
by = {}
for r in rows:
    if "method" in r:
        floor.setdefault(r["method"], []).append(r["seconds"])
    else:
        by.setdefault(r["fault_mode"] + (f" fa{r['fault_around_pages']}" if "fault_around_pages" in r else ""), []).append(r)
med = statistics.median
if floor:
    print("| C floor method | runs | seconds median | worst |")
    print("|---|---|---|---|")
    for m, s in floor.items():
        print(f"| {m} | {len(s)} | {med(s):.3f} | {max(s):.3f} |")
    print()
pipe = med(floor["uffd-pipe"]) if "uffd-pipe" in floor else None
print("| fault mode | runs | total s median / worst | TCP copy s median | total / TCP median / worst | total / C floor (median) "
      "| downtime ms median / worst | fault p99 us median / worst | runs with p99 < 1 ms | faults median / max | digest_match | guest_check |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for m, rs in by.items():
    tot = [r["total_seconds"] for r in rs]
    ratio = [r["total_seconds"] / r["tcp_baseline_seconds"] for r in rs]
    p99 = [r["fault_latency_us"]["p99"] for r in rs]
    down = [r["downtime_ms"] for r in rs]
    faults = [r["faults"] for r in rs]
    print(f"| {m} | {len(rs)} | {med(tot):.2f} / {max(tot):.2f} | {med(r['tcp_baseline_seconds'] for r in rs):.2f} | "
          f"{med(ratio):.2f} / {max(ratio):.2f} | {(med(tot) / pipe) if pipe else float('nan'):.2f} | "
          f"{med(down):.1f} / {max(down):.1f} | {med(p99):.0f} / {max(p99):.0f} | {sum(p < 1000 for p in p99)} of {len(rs)} | "
          f"{med(faults):.0f} / {max(faults)} | {sum(r['digest_match'] for r in rs)} of {len(rs)} | {sum(r['guest_check'] for r in rs)} of {len(rs)} |")
