#!/usr/bin/env python3
"""Medians of bench/migration.sh output (JSON lines on stdin), per fault mode."""
import json, statistics, sys
rows = [json.loads(l) for l in sys.stdin if l.startswith("{")]
by = {}
for r in rows:
    by.setdefault(r["fault_mode"], []).append(r)
print("| fault mode | runs | total s (median) | TCP copy s (median) | total / TCP (median of per-run ratios) | downtime ms (median, max) | fault p99 us (median) | demand / background pages (median) | digest_match | guest_check |")
print("|---|---|---|---|---|---|---|---|---|---|")
for m, rs in by.items():
    med = lambda f: statistics.median(f(r) for r in rs)
    print(f"| {m} | {len(rs)} | {med(lambda r: r['total_seconds']):.2f} | {med(lambda r: r['tcp_baseline_seconds']):.2f} | "
          f"{med(lambda r: r['total_seconds'] / r['tcp_baseline_seconds']):.2f} | "
          f"{med(lambda r: r['downtime_ms']):.1f}, {max(r['downtime_ms'] for r in rs):.1f} | "
          f"{med(lambda r: r['fault_latency_us']['p99']):.0f} | "
          f"{med(lambda r: r['demand_pages']):.0f} / {med(lambda r: r['background_pages']):.0f} | "
          f"{all(r['digest_match'] for r in rs)} | {all(r['guest_check'] for r in rs)} |")
