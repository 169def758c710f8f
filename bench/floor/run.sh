#!/usr/bin/env bash
# bench/floor/run.sh: the floor under any migration destination on this machine - a plain
# loopback TCP copy that lands its bytes in fresh memory, against the same copy into one
# reused buffer (what `--baseline` times). See tcp_floor.c for the methods.
#
#   bench/floor/run.sh [MIB] [RUNS]      (defaults: 1024 MiB, 5 alternating runs)
#
# Prints one JSON line per run, then median / worst per method and its ratio to `reuse`.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
mib=${1:-1024}; runs=${2:-5}
bin=$(mktemp -d)/tcp_floor
cc -O2 -Wall -pthread -o "$bin" "$here/tcp_floor.c"
"$bin" "$mib" "$runs" | tee /dev/stderr | python3 -c '
import json, statistics, sys
rows = [json.loads(l) for l in sys.stdin if l.startswith("{")]
by = {}
for r in rows: by.setdefault(r["method"], []).append(r["seconds"])
reuse = statistics.median(by["reuse"])
for m, s in by.items():
    print(f"{m:10s} median {statistics.median(s):.3f} s  worst {max(s):.3f} s  median/reuse {statistics.median(s) / reuse:.2f}x  ({len(s)} runs)")
' 2>&1
