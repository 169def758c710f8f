#!/usr/bin/env bash
# Peer benchmark: QEMU's own post-copy against Faultline on the same guest shape - 1 GiB,
# 1 vCPU, 512 MiB rewritten pass after pass from guest-physical 0x10000000 - over loopback,
# in two shapes: no pre-copy, and 2 s of pre-copy then post-copy. N alternating pairs per
# shape (QEMU, Faultline, QEMU, Faultline, ...), then median and worst of each and the
# Faultline/QEMU ratio of the medians.
#   bench/peers/run.sh [N] [--json]        (N defaults to 5; MIGRATE_AFTER=3 seconds; RESULTS=file)
# Installs qemu-system-x86 with apt if qemu-system-x86_64 is missing; if that fails, says so
# and skips the QEMU peer. Needs /dev/kvm, as, ld (binutils) and python3.
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=5; json=0
for a in "$@"; do
  case $a in
    --json) json=1 ;;
    ''|*[!0-9]*) echo "usage: bench/peers/run.sh [N] [--json]" >&2; exit 2 ;;
    *) runs=$a ;;
  esac
done
# Seconds the guest runs before the migration on both sides: long enough that its first pass
# is done on both, so all 512 MiB hold data (not however far the first pass got).
migrate_after=${MIGRATE_AFTER:-3}
say() { if [ "$json" = 1 ]; then echo "$*" >&2; else echo "$*"; fi; }

if ! command -v qemu-system-x86_64 >/dev/null; then
  say "peers: installing qemu-system-x86 with apt"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-system-x86; } >/dev/null 2>&1 \
     || ! command -v qemu-system-x86_64 >/dev/null; then
    say "peers: QEMU missing, skipping the QEMU peer"
    exit 0
  fi
fi

# The guest, from source.
out=bench/peers/build
mkdir -p "$out"
as --32 -o "$out/guest.o" bench/peers/guest.S
ld -m elf_i386 -N --no-warn-rwx-segments -Ttext=0x100000 -e _start -o "$out/guest.elf" "$out/guest.o"

bin=${FAULTLINE:-.build/release/faultline}
if [ -z "${FAULTLINE:-}" ]; then
  swift build -c release --product faultline >&2
fi

# RESULTS=file keeps the raw JSON lines (one per run) there.
if [ -n "${RESULTS:-}" ]; then results=$RESULTS; : > "$results"; else results=$(mktemp); trap 'rm -f "$results"' EXIT; fi
shape_flags() {  # Faultline's flags for a shape
  case $1 in
    0) echo "--precopy-rounds 0" ;;
    # Rounds until 2 s have passed since the migration started, then post-copy. The limit is
    # checked between rounds, so pre-copy ends at the first round boundary after 2 s.
    2) echo "--precopy-rounds 100 --precopy-seconds 2 --postcopy always" ;;
  esac
}
say "peers: $(qemu-system-x86_64 --version | head -1); $runs pairs per shape; load: $(cut -d' ' -f1-3 /proc/loadavg)"
for shape in 0 2; do
  for i in $(seq 1 "$runs"); do
    python3 bench/peers/qemu_postcopy.py --json --precopy-seconds "$shape" --migrate-after "$migrate_after" \
      | python3 -c 'import json,sys; d=json.loads(sys.stdin.read()); d["shape"]=float(sys.argv[1]); d["run"]=int(sys.argv[2]); print(json.dumps(d))' "$shape" "$i" \
      >> "$results" || true
    # shellcheck disable=SC2046
    "$bin" demo --vcpus 1 --memory 1G --workload dirtier --working-set 131072 --migrate-after "$migrate_after" \
        $(shape_flags "$shape") --json 2>/dev/null | tail -1 \
      | python3 -c 'import json,sys
t=sys.stdin.read().strip()
try: d=json.loads(t)
except ValueError: d={"error": "no JSON report: " + t[:200]}
d["peer"]="faultline"; d["shape"]=float(sys.argv[1]); d["run"]=int(sys.argv[2]); print(json.dumps(d))' "$shape" "$i" \
      >> "$results" || true
    [ "$json" = 1 ] || tail -2 "$results" | python3 bench/peers/summarize.py --lines
  done
done
say "peers: load after: $(cut -d' ' -f1-3 /proc/loadavg)"
if [ "$json" = 1 ]; then python3 bench/peers/summarize.py --json < "$results"; else echo; python3 bench/peers/summarize.py --table < "$results"; fi
