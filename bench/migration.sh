#!/usr/bin/env bash
# Runs the migration acceptance configuration N times per fault mode and prints one JSON
# line per run: 1 GiB guest, 4 vCPUs, dirtier running, post-copy without pre-copy, over
# loopback, with the plain-TCP yardstick measured in the same run.
#   bench/migration.sh [runs] [modes...]
# Environment: PREALLOC=1 destination memory populated first; MEMORY (default 1G);
# FLOOR=1 also runs bench/floor/tcp_floor.c once per round, between the modes (lines with
# "method"); EXTRA adds arguments to every demo.
set -euo pipefail
runs=${1:-5}; shift || true
modes=${*:-"uffd-missing vcpu-exit uffd-minor"}
bin=${FAULTLINE:-.build/release/faultline}
memory=${MEMORY:-1G}
if [ -n "${FLOOR:-}" ]; then
  floor=$(mktemp -d)/tcp_floor
  cc -O2 -Wall -pthread -o "$floor" "$(dirname "$0")/floor/tcp_floor.c"
fi
for i in $(seq 1 "$runs"); do
  for m in $modes; do
    # shellcheck disable=SC2086
    "$bin" demo --vcpus 4 --memory "$memory" --workload dirtier --precopy-rounds 0 --baseline ${PREALLOC:+--prealloc} \
      --fault-mode "$m" --json ${EXTRA:-} | tail -1
  done
  if [ -n "${FLOOR:-}" ]; then "$floor" "$(( $(numfmt --from=iec "$memory") >> 20 ))" 1; fi
done
