#!/usr/bin/env python3
"""Plots benchmark JSON as SVG (matplotlib, installed on first use).

  bench/plot.py latency  DEMO_JSON... -o latency.svg   fault-latency distribution per fault mode:
        `demo --json` lines (files, or - for stdin; lines that are not a demo report are skipped,
        so summarize_ab.py's BUILD lines and chaos lines may stay in)
  bench/plot.py scaling  COMPARE_OUT... -o scaling.svg  pages/s against vCPUs per mode, Faultline
        solid and the C reference dashed: the JSON rows `bench/compare.py` prints

Each plot's title names its input files; the figure is what the JSON holds, nothing smoothed.
"""
import argparse
import json
import subprocess
import sys


def need_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"], check=True)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def json_lines(paths):
    for path in paths:
        stream = sys.stdin if path == "-" else open(path)
        for line in stream:
            line = line.strip()
            if line.startswith("{"):
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue


def latency(args):
    """Faults per power-of-two latency bucket (bucket N: [2^N, 2^(N+1)) us), summed over the
    runs of each fault mode and shown as a share of that mode's faults."""
    by_mode = {}
    for d in json_lines(args.inputs):
        buckets = (d.get("fault_latency_log2_us") or {}).get("buckets")
        if not buckets or "fault_mode" not in d:
            continue
        total = by_mode.setdefault(d["fault_mode"], [])
        total.extend([0] * (len(buckets) - len(total)))
        for i, n in enumerate(buckets):
            total[i] += n
    if not by_mode:
        sys.exit("plot latency: no demo report with fault_latency_log2_us in the input")
    plt = need_matplotlib()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(by_mode)
    for k, (mode, counts) in enumerate(sorted(by_mode.items())):
        faults = sum(counts)
        xs = [i + (k - (len(by_mode) - 1) / 2) * width for i in range(len(counts))]
        ax.bar(xs, [100 * n / faults for n in counts], width=width, label=f"{mode} ({faults} faults)")
    n = max(len(c) for c in by_mode.values())
    ax.set_xticks(range(n), [f"{2 ** i}" for i in range(n)], rotation=45)
    ax.set_xlabel("fault latency, us (bucket start; each bucket is [2^N, 2^(N+1)) us)")
    ax.set_ylabel("% of the mode's faults")
    ax.set_title(args.title or "Demand-fault latency during post-copy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.output)


def scaling(args):
    rows = [d for d in json_lines(args.inputs) if {"mode", "vcpus", "swift", "c"} <= d.keys()]
    if not rows:
        sys.exit("plot scaling: no bench/compare.py rows in the input")
    plt = need_matplotlib()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    series = {}
    for r in rows:
        key = (r["mode"], r.get("uffd", "single"), r.get("delay", 0))
        series.setdefault(key, []).append(r)
    for (mode, uffd, delay), rs in sorted(series.items()):
        rs.sort(key=lambda r: r["vcpus"])
        label = f"{mode}" + (f", {uffd} uffd" if mode.startswith("uffd") else "") + (f", {delay} us" if delay else "")
        line, = ax.plot([r["vcpus"] for r in rs], [r["swift"] for r in rs], marker="o", label=label)
        ax.plot([r["vcpus"] for r in rs], [r["c"] for r in rs], linestyle="--", color=line.get_color())
    ax.set_xscale("log", base=2)
    ax.set_xlabel("vCPUs")
    ax.set_ylabel("pages/s (median of the runs)")
    ax.set_title(args.title or "Demand paging: Faultline (solid) against the C reference (dashed)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(args.output)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="plot", required=True)
    for name, fn in (("latency", latency), ("scaling", scaling)):
        s = sub.add_parser(name)
        s.add_argument("inputs", nargs="+")
        s.add_argument("-o", "--output", required=True, help="the SVG to write")
        s.add_argument("--title")
        s.set_defaults(fn=fn)
    args = p.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
