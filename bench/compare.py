#!/usr/bin/env python3
"""Faultline vs the C reference, side by side in one run.

For each configuration, runs `faultline bench demand-paging --json` and the C reference
`demand_paging_ref --json` alternately (C first on even runs, Swift first on odd ones),
then reports the median pages/sec of each and the median of the per-run ratios.

  bench/compare.py --ref ./demand_paging_ref --runs 5 --preset headline
  bench/compare.py --ref ./demand_paging_ref --runs 3 --preset sweep --markdown /tmp/sweep.md

Build both first, from the repository root:
  swift build -c release
  cc -O2 -pthread -o demand_paging_ref bench/demand_paging_ref.c
"""
import argparse, json, statistics, subprocess, sys, time

def run(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {out.returncode}: {out.stderr.strip()}")
    line = [l for l in out.stdout.splitlines() if l.startswith("{")][-1]
    return json.loads(line)

def args_for(cfg):
    a = ["--mode", cfg["mode"], "--uffd", cfg.get("uffd", "single"), "--readers", str(cfg.get("readers", 1)),
         "--vcpus", str(cfg["vcpus"]), "--mem-per-vcpu", str(cfg["mem"]), "--delay-us", str(cfg.get("delay", 0))]
    return a

def mem_for(vcpus):
    return 16 if vcpus <= 4 else (4 if vcpus <= 64 else 1)

PRESETS = {
    # The acceptance configurations (docs/benchmarks.md, "The acceptance configurations").
    "headline": [
        dict(mode="uffd-missing", vcpus=1, mem=64),
        dict(mode="uffd-minor", uffd="per-vcpu", vcpus=4, mem=16),
        dict(mode="vcpu-exit", vcpus=1, mem=64),
        dict(mode="vcpu-exit", vcpus=4, mem=16),
        dict(mode="uffd-missing", uffd="per-vcpu", vcpus=64, mem=4, delay=30),
        dict(mode="uffd-missing", vcpus=64, mem=4, delay=30),
        dict(mode="vcpu-exit", vcpus=64, mem=4, delay=30),
    ],
    # The vcpu-exit rows of the acceptance set.
    "vcpu-exit": [dict(mode="vcpu-exit", vcpus=1, mem=64), dict(mode="vcpu-exit", vcpus=4, mem=16)],
    # vcpu-exit against uffd-missing single, at 1 and at 64 vCPUs (the KVM Userfault series'
    # scaling claim): divide the rows' pages/s (docs/benchmarks.md, "The scaling claims").
    "scaling": [dict(mode="uffd-missing", vcpus=1, mem=64), dict(mode="vcpu-exit", vcpus=1, mem=64),
                dict(mode="uffd-missing", vcpus=64, mem=4, delay=30), dict(mode="vcpu-exit", vcpus=64, mem=4, delay=30)],
    # Every mode x {1, 4, 16, 64, 256} vCPUs x {0, 30 us}.
    "sweep": [dict(mode=m, uffd=u, vcpus=v, mem=mem_for(v), delay=d)
              for d in (0, 30) for v in (1, 4, 16, 64, 256)
              for (m, u) in (("none", "single"), ("prefilled", "single"), ("uffd-missing", "single"),
                             ("uffd-missing", "per-vcpu"), ("uffd-minor", "single"), ("uffd-minor", "per-vcpu"),
                             ("vcpu-exit", "single"))
              if not (d == 30 and m in ("none", "prefilled"))],
}

def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ref", required=True, help="the C reference binary")
    p.add_argument("--faultline", default=".build/release/faultline")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--preset", choices=PRESETS, default="headline")
    p.add_argument("--markdown", help="also write the table to this file")
    p.add_argument("--jsonl", help="append every raw result to this file")
    o = p.parse_args()
    rows = []
    raw = open(o.jsonl, "a") if o.jsonl else None
    for cfg in PRESETS[o.preset]:
        swift, c, ratios = [], [], []
        for i in range(o.runs):
            order = ("c", "s") if i % 2 == 0 else ("s", "c")
            res = {}
            for who in order:
                if who == "c":
                    res["c"] = run([o.ref] + args_for(cfg) + ["--json"])
                else:
                    res["s"] = run([o.faultline, "bench", "demand-paging", "--backend", "kvm"] + args_for(cfg) + ["--json"])
            for r in res.values():
                if r["bad_pages"] != 0:
                    raise RuntimeError(f"bad pages in {r}")
                if raw: raw.write(json.dumps(r) + "\n")
            swift.append(res["s"]["pages_per_sec"]); c.append(res["c"]["pages_per_sec"])
            ratios.append(res["s"]["pages_per_sec"] / res["c"]["pages_per_sec"])
        row = dict(cfg, swift=statistics.median(swift), c=statistics.median(c), ratio=statistics.median(ratios),
                   swift_runs=swift, c_runs=c)
        rows.append(row)
        print(json.dumps(row), flush=True)
    table = ["| mode | uffd | vCPUs | MiB/vCPU | delay us | Faultline pgs/s | C pgs/s | Faultline/C (median of per-run ratios) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['mode']} | {r.get('uffd','single')} | {r['vcpus']} | {r['mem']} | {r.get('delay',0)} | "
                     f"{r['swift']:.0f} | {r['c']:.0f} | {r['ratio']:.2f} |")
    print("\n".join(table))
    if o.markdown:
        with open(o.markdown, "w") as f:
            f.write("\n".join(table) + "\n")

if __name__ == "__main__":
    main()
