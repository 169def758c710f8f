#!/usr/bin/env python3
"""Reads bench/restore.sh's JSON lines on stdin; prints medians and worst runs per mode, with
the time to fully resident as a ratio of the fresh-memory floor measured in the same round."""
import json
import statistics
import sys

floor = None
rows = {}
for line in sys.stdin:
    line = line.strip()
    if not line.startswith("{"):
        continue
    d = json.loads(line)
    if d.get("method") == "file_floor":
        floor = d["ms"]
        continue
    if d.get("side") != "restore":
        continue
    key = d["mode"] if d["mode"] == "eager" else f'lazy {d["fault_mode"]}'
    r = rows.setdefault(key, {"first": [], "launch": [], "resident": [], "ratio": [], "p99": [], "ok": 0, "n": 0})
    r["n"] += 1
    r["ok"] += 1 if d["digest_match"] and d["guest_check"] else 0
    r["first"].append(d["first_instruction_ms"])
    if "launch_to_first_instruction_ms" in d:
        r["launch"].append(d["launch_to_first_instruction_ms"])
    r["resident"].append(d["resident_ms"])
    if floor:
        r["ratio"].append(d["resident_ms"] / floor)
    if d["faults"]:
        r["p99"].append(d["fault_latency_us"]["p99"])

def fmt(values, worst=max):
    if not values:
        return "-"
    return f"{statistics.median(values):.1f} ({worst(values):.1f})"

print("| restore | first instruction ms | from launch ms | resident ms | resident / floor | fault p99 us | digest and guest check |")
print("|---|---|---|---|---|---|---|")
for key, r in rows.items():
    print(f'| {key} | {fmt(r["first"])} | {fmt(r["launch"])} | {fmt(r["resident"])} | {fmt(r["ratio"])} | {fmt(r["p99"])} | {r["ok"]} of {r["n"]} |')
print("\nmedian (worst run); the floor is bench/floor/file_floor.c on the same memory file, in the same round")
