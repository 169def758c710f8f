#!/usr/bin/env bash
# Runs every configuration of the CI migration matrix (fault mode x pre-copy rounds x
# workload, 64 MiB, --postcopy always so pre-copy runs exactly the rounds asked for) N times,
# alternating configurations, and prints one line per configuration: passes out of N.
# A pass: exit 0, the rounds asked for, digest_match and guest_check true.
#   bench/migration_matrix.sh 10 [path/to/faultline]
set -u
n=${1:-10}
bin=${2:-.build/release/faultline}
declare -A pass
for i in $(seq 1 "$n"); do
  for mode in vcpu-exit uffd-missing uffd-minor; do
    for rounds in 0 1 2 5; do
      for wl in selfcheck dirtier; do
        key="$mode rounds=$rounds $wl"
        err=$(mktemp)
        out=$(timeout 240 "$bin" demo --memory 64M --json --migrate-after 0.5 --run-after 0.5 --fault-mode "$mode" \
              --workload "$wl" --precopy-rounds "$rounds" --postcopy always --precopy-seconds 60 2>"$err" | tail -1)
        ok=$(printf '%s' "$out" | python3 -c "
import json,sys
try:
    d=json.loads(sys.stdin.read()); print(int(d.get('precopy_rounds')==$rounds and d.get('digest_match') is True and d.get('guest_check') is True))
except Exception: print(0)")
        pass[$key]=$(( ${pass[$key]:-0} + ok ))
        if [ "$ok" != 1 ]; then
          # Keep what a failed run printed: MATRIX_LOGS (default /tmp/faultline-matrix-failures).
          logs=${MATRIX_LOGS:-/tmp/faultline-matrix-failures}; mkdir -p "$logs"
          f="$logs/$(echo "$key" | tr ' =' '__')-$i"
          printf '%s\n' "$out" > "$f.stdout"; cp "$err" "$f.stderr"
          echo "FAILED: $key (iteration $i): $f.stderr" >&2
        fi
        rm -f "$err"
      done
    done
  done
done
for key in "${!pass[@]}"; do echo "$key: ${pass[$key]} of $n"; done | sort
