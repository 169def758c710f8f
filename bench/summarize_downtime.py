#!/usr/bin/env python3
"""bench/downtime.sh output (JSON lines on stdin): downtime per (rounds, workload, mode)."""
import json, statistics, sys
rows = [json.loads(l) for l in sys.stdin if l.startswith("{")]
cells = {}
for r in rows:
    cells.setdefault((r["asked_rounds"], r["workload"], r["fault_mode"]), []).append(r)
print("| pre-copy rounds (ran) | workload | fault mode | runs | downtime ms median / worst | largest part in the worst run | digest_match | guest_check |")
print("|---|---|---|---|---|---|---|---|")
for (rounds, w, m), rs in sorted(cells.items()):
    d = [r["downtime_ms"] for r in rs]
    worst = max(rs, key=lambda r: r["downtime_ms"])
    part = max(worst["downtime_parts_ms"].items(), key=lambda kv: kv[1]) if worst.get("downtime_parts_ms") else ("-", 0)
    ran = sorted({r["precopy_rounds"] for r in rs})
    print(f"| {rounds} ({','.join(map(str, ran))}) | {w} | {m} | {len(rs)} | {statistics.median(d):.1f} / {max(d):.1f} | "
          f"{part[0]} {part[1]:.1f} | {sum(r['digest_match'] for r in rs)} of {len(rs)} | {sum(r['guest_check'] for r in rs)} of {len(rs)} |")
allruns = [r["downtime_ms"] for r in rows]
if allruns:
    print(f"\nall {len(allruns)} runs: median {statistics.median(allruns):.1f} ms, worst {max(allruns):.1f} ms, "
          f"{sum(x < 20 for x in allruns)} of {len(allruns)} under 20 ms")
