#!/usr/bin/env bash
# Downtime after 0, 1 and 5 pre-copy rounds, for the dirtier and selfcheck guests, in every
# fault mode: 1 GiB, 4 vCPUs, post-copy always (so the switch-over is the same kind in every
# cell), pre-copy bounded by 60 s so that 5 rounds of 1 GiB really run here. One JSON line
# per run (the demo's --json), in alternating order.
#   bench/downtime.sh [runs] [modes...]        then: python3 bench/summarize_downtime.py < out
set -euo pipefail
runs=${1:-2}; shift || true
modes=${*:-"vcpu-exit uffd-missing uffd-minor"}
bin=${FAULTLINE:-.build/release/faultline}
for i in $(seq 1 "$runs"); do
  for rounds in 0 1 5; do
    for w in dirtier selfcheck; do
      for m in $modes; do
        "$bin" demo --vcpus 4 --memory "${MEMORY:-1G}" --workload "$w" --precopy-rounds "$rounds" --precopy-seconds 60 \
          --postcopy always --fault-mode "$m" --json | tail -1 | sed "s/^{/{\"workload\":\"$w\",\"asked_rounds\":$rounds,/"
      done
    done
  done
done
