#!/bin/sh
# bench/private-conversions.sh RUNS CONVERSIONS: the OVMF bounce-buffer pattern
# inside the kernel rig - eager vs lazy discard vs the no-conversion baseline, 1- and 2-page
# buffers, alternated run by run. One JSON line per run (faultline bench conversions --json).
# Run it through the rig: rig/run -- sh bench/private-conversions.sh 5 2000
runs=${1:-5}; conversions=${2:-2000}
bin=${FAULTLINE_BIN:-.build/release/faultline}
i=1
while [ "$i" -le "$runs" ]; do
  for pages in 1 2; do
    for mode in "--discard eager" "--discard lazy" "--baseline"; do
      # shellcheck disable=SC2086
      "$bin" bench conversions --conversions "$conversions" --pages "$pages" $mode --json | sed "s/^{/{\"run\":$i,/"
    done
  done
  i=$((i + 1))
done
