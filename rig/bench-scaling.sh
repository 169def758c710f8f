#!/bin/sh
# rig/bench-scaling.sh: the seed's scaling table (seed 000, KVM Userfault) measured inside the
# rig - run it on the KVM Userfault kernel:
#
#   rig/run --kernel ../shared/rig/bzImage-6.12-userfault --smp 2 --timeout 3000 -- sh rig/bench-scaling.sh [RUNS] [MIB_PER_VCPU]
#
# For 1, 2, 4, 8 and 16 vCPUs, without and with --delay-us 30: bench demand-paging in
# vcpu-exit (KVM Userfault), uffd-missing with one userfaultfd, and uffd-missing with one
# userfaultfd per vCPU; RUNS runs each (default 5), MIB_PER_VCPU MiB per vCPU (default 4).
# One JSON line per run on stdout (prefixed "scaling: "); rig/scaling-table.py summarises.
bin=${FAULTLINE_BIN:-.build/release/faultline}
runs=${1:-5}
mib=${2:-4}
for delay in 0 30; do
  for vcpus in 1 2 4 8 16; do
    for mode in "vcpu-exit single" "uffd-missing single" "uffd-missing per-vcpu"; do
      set -- $mode
      "$bin" bench demand-paging --mode "$1" --uffd "$2" --vcpus "$vcpus" --mem-per-vcpu "$mib" --delay-us "$delay" \
        --repeat "$runs" --json 2>&1 | sed 's/^/scaling: /'
    done
  done
done
