#!/usr/bin/env bash
# Restore acceptance runs: a snapshot of a running dirtier guest (1 GiB, 2 vCPUs, RAM
# prefilled so that every page holds data), then N rounds of: the fresh-memory floor (the
# memory file read into fresh memory, bench/floor/file_floor.c), a lazy restore in each fault
# mode, and an eager restore. One JSON line per run; bench/summarize_restore.py makes the table.
#   bench/restore.sh [runs] [modes...]
# Environment: MEMORY (default 1G), SNAPSHOT (default: a new one under /var/tmp).
set -euo pipefail
runs=${1:-5}; shift || true
modes=${*:-"vcpu-exit uffd-missing uffd-minor"}
bin=${FAULTLINE:-.build/release/faultline}
memory=${MEMORY:-1G}
snapshot=${SNAPSHOT:-/var/tmp/faultline-restore-bench-$memory}
floor=$(mktemp -d)/file_floor
cc -O2 -Wall -o "$floor" "$(dirname "$0")/floor/file_floor.c"
if [ ! -f "$snapshot/manifest.json" ]; then
  "$bin" run --vcpus 2 --memory "$memory" --workload dirtier --prefill --snapshot-to "$snapshot" --snapshot-after 3 --json >&2
fi
"$bin" snapshot verify "$snapshot" >&2   # also warms the page cache
# launched CMD...: runs the restore, adds "launch_to_first_instruction_ms": from just before the
# process is started (CLOCK_MONOTONIC, as the report's first_instruction_monotonic_ns).
launched() {
  python3 -c '
import json, subprocess, sys, time
t = time.monotonic_ns()
out = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, text=True, check=True).stdout
d = json.loads(out.strip().splitlines()[-1])
d["launch_to_first_instruction_ms"] = (d["first_instruction_monotonic_ns"] - t) / 1e6
print(json.dumps(d))' "$@"
}
for i in $(seq 1 "$runs"); do
  "$floor" "$snapshot/memory.bin"
  for m in $modes; do launched "$bin" restore "$snapshot" --lazy --fault-mode "$m" --run-after 0.5 --json; done
  launched "$bin" restore "$snapshot" --eager --run-after 0.5 --json
done
