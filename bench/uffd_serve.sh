#!/usr/bin/env bash
# Page-server throughput: `faultline uffd-serve` (supervised: the worker process serves) against
# the C handler bench/uffd_handler_ref.c, both serving Firecracker's side as played by
# `faultline uffd-serve client` (anonymous private memory, a userfaultfd made as Firecracker
# makes it, every page faulted once from THREADS threads, every byte checked afterwards).
# Runs alternate between the two servers; prints each run, then median and worst pages/s, and
# the servers' CPU time per page filled (user + system, from /usr/bin/time: less disturbed by
# other load on the machine than the wall clock is).
#
#   bench/uffd_serve.sh [RUNS] [MIB] [THREADS...]     defaults: 5 runs, 256 MiB, threads 1 and 4
#   FAULTLINE=path/to/faultline UFFD_SERVE_ARGS=--in-process bench/uffd_serve.sh
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
mib=${2:-256}
shift $(( $# > 2 ? 2 : $# ))
threads_list=${*:-1 4}
faultline=${FAULTLINE:-.build/release/faultline}
[ -x "$faultline" ] || swift build -c release --product faultline >&2
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cc -O2 -Wall -o "$dir/uffd_handler_ref" bench/uffd_handler_ref.c
head -c $((mib << 20)) /dev/urandom > "$dir/memory"
cat "$dir/memory" > /dev/null   # in the page cache for every run alike

# one_run KIND THREADS: prints "KIND THREADS PAGES_PER_SECOND SERVER_CPU_US_PER_PAGE"
one_run() {
  local kind=$1 threads=$2 socket="$dir/$1.sock" server
  rm -f "$socket"
  if [ "$kind" = uffd-serve ]; then
    /usr/bin/time -f "%U %S" -o "$dir/cpu" "$faultline" uffd-serve --socket "$socket" --memory "$dir/memory" --exit-on-hangup --json ${UFFD_SERVE_ARGS:-} \
      > "$dir/server.out" 2> "$dir/server.err" &
  else
    /usr/bin/time -f "%U %S" -o "$dir/cpu" "$dir/uffd_handler_ref" "$socket" "$dir/memory" > "$dir/server.out" 2> "$dir/server.err" &
  fi
  server=$!
  for _ in $(seq 500); do [ -S "$socket" ] && break; sleep 0.01; done
  local out
  if ! out=$("$faultline" uffd-serve client --socket "$socket" --memory "$dir/memory" --regions "${mib}M" \
               --threads "$threads" --json); then
    echo "client failed against $kind: $out" >&2; cat "$dir/server.err" >&2; kill "$server" 2>/dev/null; exit 1
  fi
  wait "$server" || { echo "$kind exited with an error" >&2; cat "$dir/server.err" >&2; exit 1; }
  python3 -c 'import json,sys; r=json.loads(sys.argv[3]); assert r["mismatched_pages"]==0, r; u,s=map(float,open(sys.argv[4]).read().split()[-2:]); print(sys.argv[1], sys.argv[2], int(r["pages_per_second"]), "%.2f" % ((u+s)*1e6/r["pages"]))' \
    "$kind" "$threads" "$out" "$dir/cpu"
}

results="$dir/results"
for threads in $threads_list; do
  for run in $(seq "$runs"); do
    if [ $((run % 2)) = 1 ]; then order="uffd-serve c-ref"; else order="c-ref uffd-serve"; fi
    for kind in $order; do one_run "$kind" "$threads" | tee -a "$results"; done
  done
done
python3 - "$results" "$mib" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
print(f"\n{sys.argv[2]} MiB, pages/s (median / worst of {sum(1 for r in rows if r[0]=='c-ref' and r[1]==rows[0][1])} runs):")
for t in sorted({int(r[1]) for r in rows}):
    got = {k: [int(r[2]) for r in rows if r[0] == k and int(r[1]) == t] for k in ("uffd-serve", "c-ref")}
    cpu = {k: statistics.median([float(r[3]) for r in rows if r[0] == k and int(r[1]) == t]) for k in got}
    med = {k: statistics.median(v) for k, v in got.items()}
    worst = {k: min(v) for k, v in got.items()}
    paired = sorted(a / b for a, b in zip(got['uffd-serve'], got['c-ref']))  # run i of each, back to back
    print(f"  threads {t}: uffd-serve {med['uffd-serve']:.0f} / {worst['uffd-serve']}   C handler {med['c-ref']:.0f} / {worst['c-ref']}"
          f"   ratio of medians {med['uffd-serve']/med['c-ref']:.3f}, of worst runs {worst['uffd-serve']/worst['c-ref']:.3f},"
          f" paired runs median {statistics.median(paired):.3f} (lowest {paired[0]:.3f})"
          f"   server CPU us/page (median) {cpu['uffd-serve']:.2f} vs {cpu['c-ref']:.2f}")
PY
