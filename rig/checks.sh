#!/bin/sh
# rig/checks.sh: the rig-side half of rig/test - runs inside the rig VM (TDP, no shadow
# paging), in the repository's root, against .build/release/faultline. Prints one line per
# check and exits with the number of failed checks.
bin=${FAULTLINE_BIN:-.build/release/faultline}
out=$(mktemp); err=$(mktemp)
begin=$(date +%s.%N)
failed=0
pass() { echo "rig check $1: ok${2:+ - $2}"; }
flunk() { echo "rig check $1: FAILED - $2"; echo "--- stdout"; cat "$out"; echo "--- stderr"; cat "$err"; failed=$((failed + 1)); }
clock() { date +%s.%N; }
took() { awk -v a="$1" -v b="$(clock)" 'BEGIN { printf "%.1f", b - a }'; }

# (a) the probe runs and reports what a vCPU fault on missing RAM produces here, and what
#     --fault-mode auto picks.
t=$(clock)
if ! "$bin" probe >"$out" 2>"$err"; then flunk "a (probe)" "exit status $?"
elif ! grep -q "vCPU fault on missing RAM" "$out"; then flunk "a (probe)" "no vCPU fault row"
elif ! grep -q "^Migration --fault-mode auto: " "$out"; then flunk "a (probe)" "no auto line"
else pass "a (probe)" "$(took "$t") s; vCPU fault on missing RAM: $(sed -n 's/^  vCPU fault on missing RAM *\(.*[^ ]\) *(userfaultfd.*/\1/p' "$out"); auto picks $(sed -n 's/^Migration --fault-mode auto: \([a-z-]*\).*/\1/p' "$out")"
fi
auto=$(sed -n 's/^Migration --fault-mode auto: \([a-z-]*\).*/\1/p' "$out")

# (b) the default demo (fault mode auto) migrates with matching digests and a green guest.
t=$(clock)
if ! "$bin" demo --memory 32M >"$out" 2>"$err"; then flunk "b (demo, default fault mode)" "exit status $?"
elif ! grep -q "fault mode $auto (auto: " "$out"; then flunk "b (demo, default fault mode)" "the report does not name the mode auto picked ($auto) and why"
else pass "b (demo --memory 32M, default fault mode)" "$(took "$t") s in fault mode $auto"
fi

# (c)-(e) vcpu-exit cannot work with TDP: refused with the reason before anything starts.
refused() {  # label, expected stderr text, command...
  label=$1 text=$2; shift 2
  if [ "$auto" = vcpu-exit ]; then echo "rig check $label: skipped - vcpu-exit works on this kernel"; return; fi
  t=$(clock)
  "$@" >"$out" 2>"$err"; rc=$?
  if [ $rc -ne 2 ]; then flunk "$label" "exit status $rc, expected 2"
  elif ! grep -qF -- "$text" "$err"; then flunk "$label" "stderr lacks '$text'"
  elif grep -qE "listening on|demo:|Total guest execution time" "$out"; then flunk "$label" "it started before refusing"
  else pass "$label" "$(took "$t") s; exit 2 before starting: $(sed 's/^faultline: error: //' "$err" | head -1)"
  fi
}
refused "c (demo --fault-mode vcpu-exit refused)" "--fault-mode vcpu-exit cannot work on this kernel: a vCPU fault on missing RAM returns a bare EFAULT" \
  "$bin" demo --memory 32M --fault-mode vcpu-exit
refused "d (receive --fault-mode vcpu-exit refused before listening)" "--fault-mode vcpu-exit cannot work on this kernel" \
  "$bin" receive --listen 127.0.0.1:0 --fault-mode vcpu-exit --accept-seconds 5
refused "e (bench demand-paging --mode vcpu-exit refused)" "--mode vcpu-exit cannot work on this kernel" \
  "$bin" bench demand-paging --mode vcpu-exit --vcpus 2 --mem-per-vcpu 8

# (p1), (p2) private memory: a SW-protected VM whose guest converts a bounce buffer 1000
#     times (KVM_HC_MAP_GPA_RANGE), contents checked exactly, attributes read back.
private_check() {  # label, options...
  label=$1; shift
  t=$(clock)
  if ! "$bin" private --conversions 1000 "$@" >"$out" 2>"$err"; then flunk "$label" "exit status $?"
  elif ! grep -q "^Verification: OK" "$out"; then flunk "$label" "not verified"
  else pass "$label" "$(took "$t") s; $(grep "^contents:" "$out" | sed 's/ observations checked exactly//')"
  fi
}
private_check "p1 (private --discard lazy)" --discard lazy
private_check "p2 (private --discard eager --shared-backing memfd)" --discard eager --shared-backing memfd

rm -f "$out" "$err"
echo "rig checks: $failed failed, $(took "$begin") s inside the rig"
exit $failed
