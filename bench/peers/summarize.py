#!/usr/bin/env python3
"""Summarizes bench/peers/run.sh's JSON lines (one per run, QEMU and Faultline alternating).

Compared fields, per run:
  total     QEMU: `migrate` sent -> the later `completed` event (qemu_postcopy.py total_seconds);
            Faultline: the source report's total_seconds (migration start, before connecting,
            -> the destination confirmed the digest of all memory)
  downtime  QEMU: its own `downtime` (source: vCPUs stopped -> post-copy "run" sent);
            Faultline: downtime_ms (source: vCPUs paused -> commit sent)
  post-copy QEMU: destination RESUME -> the later `completed` event;
            Faultline: postcopy_seconds (commit -> digest confirmed)
  pre-copy  QEMU: `migrate` sent -> `postcopy-active`; Faultline: the sum of its rounds' seconds
Medians and worst cases are over the runs that passed their checks (ok).
  summarize.py [--lines | --table | --json] < results.jsonl   (--table: without the per-run lines)
"""

import json
import statistics
import sys


def normalize(d):
    if d.get("peer") == "qemu":
        ok = bool(d.get("ok"))
        # A run that completed can still fail its checks: say which (the harness sets no error then).
        why = d.get("error") or (None if ok else f"mode {d.get('mode')}, destination guest running "
                                 f"{d.get('destination_guest_running')}, ahead of the source {d.get('destination_ahead_of_source')}")
        return {"peer": "qemu", "shape": d.get("shape"), "run": d.get("run"), "ok": ok, "error": why,
                "total_s": d.get("total_seconds"), "downtime_ms": d.get("downtime_ms"),
                "postcopy_s": d.get("postcopy_phase_seconds"), "precopy_s": d.get("precopy_seconds") or 0.0,
                "extra": f"STOP->RESUME {d.get('stop_to_resume_ms')} ms, blocktime {d.get('postcopy_blocktime_ms')} ms, "
                         f"{d.get('ram_postcopy_requests')} page requests, preempt {'on' if d.get('postcopy_preempt') else 'off'}"}
    ok = (not d.get("error") and d.get("digest_match") is True and d.get("guest_check") is True
          and d.get("mode") == "postcopy")
    rounds = d.get("precopy") or []
    return {"peer": "faultline", "shape": d.get("shape"), "run": d.get("run"), "ok": ok,
            "error": d.get("error") or (None if ok else f"mode {d.get('mode')}, digest_match {d.get('digest_match')}, "
                                        f"guest_check {d.get('guest_check')}"),
            "total_s": d.get("total_seconds"), "downtime_ms": d.get("downtime_ms"),
            "postcopy_s": d.get("postcopy_seconds"), "precopy_s": sum(r.get("seconds", 0) for r in rounds),
            "extra": f"{len(rounds)} round(s), switch-over {d.get('switchover_ms')} ms, "
                     f"{d.get('demand_pages')} demand pages, fault mode {d.get('fault_mode')}, downtime parts "
                     + ", ".join(f"{k} {v:.1f}" for k, v in (d.get("downtime_parts_ms") or {}).items())}


def line(r):
    head = f"shape {r['shape']:g} s pre-copy, run {r['run']}, {r['peer']:9}"
    if not r["ok"]:
        return f"{head}: FAILED ({r['error']})"
    return (f"{head}: total {r['total_s']:.3f} s, downtime {r['downtime_ms']:.1f} ms, "
            f"pre-copy {r['precopy_s']:.3f} s, post-copy {r['postcopy_s']:.3f} s; {r['extra']}")


def stats(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "worst": max(values), "best": min(values), "n": len(values)}


def summarize(rows):
    out = []
    for shape in sorted({r["shape"] for r in rows}):
        entry = {"precopy_seconds_requested": shape}
        for peer in ("qemu", "faultline"):
            runs = [r for r in rows if r["shape"] == shape and r["peer"] == peer]
            good = [r for r in runs if r["ok"]]
            entry[peer] = {"runs": len(runs), "ok": len(good),
                           **{k: stats([r[k] for r in good]) for k in ("total_s", "downtime_ms", "postcopy_s", "precopy_s")}}
        ratios = {}
        for k in ("total_s", "downtime_ms", "postcopy_s"):
            q, f = entry["qemu"][k], entry["faultline"][k]
            ratios[k] = round(f["median"] / q["median"], 3) if q and f and q["median"] else None
        entry["faultline_over_qemu_median"] = ratios
        out.append(entry)
    return out


def fmt(s, unit, digits):
    return "-" if s is None else f"{s['median']:.{digits}f} / {s['worst']:.{digits}f} {unit}"


def main():
    rows = [normalize(json.loads(l)) for l in sys.stdin if l.strip()]
    if "--lines" in sys.argv:
        for r in rows:
            print(line(r))
        return
    summary = summarize(rows)
    if "--json" in sys.argv:
        print(json.dumps({"runs": rows, "summary": summary}))
        return
    if "--table" not in sys.argv:
        for r in rows:
            print(line(r))
        print()
    print("median / worst           total            downtime          post-copy phase   pre-copy")
    for e in summary:
        for peer in ("qemu", "faultline"):
            p = e[peer]
            print(f"{e['precopy_seconds_requested']:g} s pre-copy {peer:9} ({p['ok']}/{p['runs']} ok)  "
                  f"{fmt(p['total_s'], 's', 3):16} {fmt(p['downtime_ms'], 'ms', 1):17} "
                  f"{fmt(p['postcopy_s'], 's', 3):17} {fmt(p['precopy_s'], 's', 3)}")
        ratio = e["faultline_over_qemu_median"]
        print(f"{e['precopy_seconds_requested']:g} s pre-copy Faultline/QEMU (medians): total {ratio['total_s']}, "
              f"downtime {ratio['downtime_ms']}, post-copy phase {ratio['postcopy_s']}")


if __name__ == "__main__":
    main()
