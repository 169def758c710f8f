#!/usr/bin/env bash
# Working-set replay against plain lazy restore: a 1 GiB snapshot of a dirtier whose 64 MiB
# working set (2 vCPUs x 8192 pages) is spread over all of RAM in a fixed scattered order,
# the rest of RAM holding data (--prefill); one recording; then N rounds of a plain lazy restore
# and a restore that replays the recording, alternately. One JSON line per restore, with
# "replay" added; bench/summarize_working_set.py makes the table.
#   bench/working_set.sh [runs] [fault-mode]
set -euo pipefail
runs=${1:-5}
mode=${2:-vcpu-exit}
bin=${FAULTLINE:-.build/release/faultline}
snapshot=${SNAPSHOT:-/var/tmp/faultline-working-set-bench}
set_file=$snapshot.working-set.json
if [ ! -f "$snapshot/manifest.json" ]; then
  "$bin" run --vcpus 2 --memory 1G --workload dirtier --working-set 8192 --order scattered --prefill \
    --snapshot-to "$snapshot" --snapshot-after 3 --json >&2
fi
"$bin" snapshot verify "$snapshot" >&2
"$bin" restore "$snapshot" --fault-mode "$mode" --record-working-set "$set_file" --record-seconds 4 --run-after 1 >&2
for i in $(seq 1 "$runs"); do
  "$bin" restore "$snapshot" --fault-mode "$mode" --run-after 1 --json | tail -1 | sed 's/^{/{"replay":false,/'
  "$bin" restore "$snapshot" --fault-mode "$mode" --prefetch "$set_file" --run-after 1 --json | tail -1 | sed 's/^{/{"replay":true,/'
done
