#!/usr/bin/env bash
# Runs the migration acceptance configuration N times per fault mode and prints one JSON
# line per run: 1 GiB guest, 4 vCPUs, dirtier running, post-copy without pre-copy, over
# loopback, with the plain-TCP yardstick measured in the same run.
#   bench/migration.sh [runs] [modes...]      (PREALLOC=1: destination memory populated first)
set -euo pipefail
runs=${1:-5}; shift || true
modes=${*:-"uffd-missing vcpu-exit uffd-minor"}
bin=${FAULTLINE:-.build/release/faultline}
for i in $(seq 1 "$runs"); do
  for m in $modes; do
    "$bin" demo --vcpus 4 --memory 1G --workload dirtier --precopy-rounds 0 --baseline ${PREALLOC:+--prealloc} --fault-mode "$m" --json | tail -1
  done
done
