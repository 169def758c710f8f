#!/usr/bin/env python3
"""Reads bench/working_set.sh's lines; prints demand faults and the time until every vCPU has
touched its whole working set (whole_pass_ms), plain lazy against replay, with paired ratios."""
import json
import statistics
import sys

runs = {False: [], True: []}
for line in sys.stdin:
    if line.startswith("{"):
        d = json.loads(line)
        runs[d["replay"]].append(d)

def row(name, rs):
    faults = [r["faults"] for r in rs]
    touched = [r["whole_pass_ms"] for r in rs if r.get("whole_pass_ms")]
    ok = sum(1 for r in rs if r["digest_match"] and r["guest_check"])
    print(f"| {name} | {statistics.median(faults):.0f} ({max(faults)}) | "
          f"{statistics.median(touched):.0f} ({max(touched):.0f}) | {ok} of {len(rs)} |")

print("| restore | demand faults | working set touched, ms from the start | digest and guest check |")
print("|---|---|---|---|")
row("plain lazy", runs[False])
row("replay", runs[True])
pairs = list(zip(runs[False], runs[True]))
fault_ratio = statistics.median(p["faults"] / max(r["faults"], 1) for p, r in pairs)
time_ratio = statistics.median(p["whole_pass_ms"] / r["whole_pass_ms"] for p, r in pairs)
print(f"\npaired medians: replay cuts demand faults {fault_ratio:.1f}x and the time to touch the working set {time_ratio:.2f}x")
print("median (worst run)")
