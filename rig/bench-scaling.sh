#!/bin/sh
# rig/bench-scaling.sh: the KVM Userfault series' scaling comparison (vcpu-exit against one
# userfaultfd and one per vCPU) measured inside the rig - run it on the KVM Userfault kernel:
#
#   rig/run --kernel ../shared/rig/bzImage-6.12-userfault --smp 2 --timeout 3000 -- \
#     sh rig/bench-scaling.sh [RUNS] [MIB_PER_VCPU] [DELAYS] [VCPU_COUNTS]
#
# For each vCPU count (default "1 2 4 8 16") and delay (default "0 30" us): bench demand-paging
# in vcpu-exit (KVM Userfault), uffd-missing with one userfaultfd, and uffd-missing with one
# userfaultfd per vCPU; RUNS runs each (default 5), MIB_PER_VCPU MiB per vCPU (default 4).
# One JSON line per run on stdout (prefixed "scaling: "); rig/scaling-table.py summarises.
# The rig's kernel sometimes dies under multi-threaded TCG: run one cell per boot and retry it
# (docs/benchmarks.md, "KVM Userfault", has the loop and the results).
bin=${FAULTLINE_BIN:-.build/release/faultline}
runs=${1:-5}
mib=${2:-4}
for delay in ${3:-0 30}; do
  for vcpus in ${4:-1 2 4 8 16}; do
    for mode in "vcpu-exit single" "uffd-missing single" "uffd-missing per-vcpu"; do
      set -- $mode
      "$bin" bench demand-paging --mode "$1" --uffd "$2" --vcpus "$vcpus" --mem-per-vcpu "$mib" --delay-us "$delay" \
        --repeat "$runs" --json 2>&1 | sed 's/^/scaling: /'
    done
  done
done
