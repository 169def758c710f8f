#!/usr/bin/env python3
"""Summarize `faultline bench conversions --json` lines (e.g. bench/private-conversions.sh
output, console noise allowed): per discard mode and buffer size, the median and worst of
conversions/s (hypercalls/s for the baseline) and of each part's microseconds per conversion."""
import json, statistics, sys

rows = []
for line in sys.stdin:
    line = line.strip().replace("\r", "")
    start = line.find('{"')
    if start < 0:
        continue
    try:
        rows.append(json.loads(line[start:]))
    except json.JSONDecodeError:
        pass

groups = {}
for r in rows:
    groups.setdefault((r["buffer_pages"], r["discard"]), []).append(r)

def med_worst(values, higher_is_better):
    m = statistics.median(values)
    w = min(values) if higher_is_better else max(values)
    return f"{m:,.0f} / {w:,.0f}" if m >= 100 else f"{m:.1f} / {w:.1f}"

print("| buffer | discard | runs | conversions/s (median / worst) | per conversion, us (median / worst): KVM_SET_MEMORY_ATTRIBUTES | discard | KVM_RUN | userspace | total | discard calls | kept / zeros |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
order = {"eager": 0, "lazy": 1, "baseline": 2}
for (pages, mode), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 9))):
    if not all(r["verified"] for r in rs):
        print(f"<!-- {pages} {mode}: {sum(not r['verified'] for r in rs)} runs NOT verified -->")
    rate_key = "hypercalls_per_sec" if mode == "baseline" else "conversions_per_sec"
    n = "hypercalls" if mode == "baseline" else "conversions"
    def part(k):
        if mode == "baseline":
            # nothing converts: per hypercall instead
            if k == "kvm_run":
                return med_worst([r["us_per_exit_kvm_run"] for r in rs], False)
            if k == "userspace" and "us_per_exit_userspace" in rs[0]:
                return med_worst([r["us_per_exit_userspace"] for r in rs], False)
            if k == "total":
                return med_worst([1e6 / r["hypercalls_per_sec"] for r in rs], False)
            return "-"
        return med_worst([r["us_per_conversion"][k] for r in rs], False)
    kept = f'{statistics.median([r["kept"]["shared"] + r["kept"]["private"] for r in rs]):.0f} / ' \
           f'{statistics.median([r["discarded_seen"]["shared"] + r["discarded_seen"]["private"] for r in rs]):.0f}'
    print(f"| {pages} | {mode} | {len(rs)} | {med_worst([r[rate_key] for r in rs], True)}{' hypercalls/s' if mode == 'baseline' else ''} "
          f"| {part('set_attributes')} | {part('discard')} | {part('kvm_run')} | {part('userspace')} | {part('total')} "
          f"| {statistics.median([r['discard_calls'] for r in rs]):.0f} | {kept if mode != 'baseline' else '-'} |")
