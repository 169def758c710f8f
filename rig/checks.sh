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
# has PATTERN: the last command's JSON (in $out) holds PATTERN (a grep -E pattern; keys in any order).
has() { grep -Eq "$1" "$out"; }
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
probe=$(mktemp); cp "$out" "$probe"
# KVM Userfault: the memslot flag is accepted (the probe tries it; the capability number is not used).
userfault=no; grep -q "^  KVM_MEM_USERFAULT *yes" "$out" && userfault=yes
mechanism=$(sed -n 's/^  vcpu-exit mechanism *\([a-z-]*\).*/\1/p' "$out")

# (k) where a guest_memfd maps (the 7.3 kernel), the probe's guest_memfd-only section: each
#     thing tried on a default VM worked, and the fault and migration paths follow from it.
if grep -q "^  guest_memfd mmap  *yes" "$probe"; then
  no=""
  for row in "userfaultfd MISSING" "userfaultfd MINOR" "write() populates (WRITE)" "KVM_MEM_USERFAULT memslot" \
             "fault path uffd-missing" "fault path uffd-minor" "fault path vcpu-exit" "path stop-and-copy" \
             "path postcopy-userfaultfd" "path postcopy-kvm-userfault"; do
    grep -q "^  $row  *yes" "$probe" || no="$no${no:+, }$row"
  done
  flags=$(sed -n 's/^  KVM_CAP_GUEST_MEMFD_FLAGS (VM)  *\(.*\)/\1/p' "$probe")
  if [ -n "$no" ]; then cp "$probe" "$out"; : >"$err"; flunk "k (guest_memfd-only probe)" "not yes: $no"
  else pass "k (guest_memfd-only probe)" "flags $flags; mmap, userfaultfd MISSING and MINOR, write(), KVM_MEM_USERFAULT: yes; $(sed -n '/^guest_memfd-only VM/,$p' "$probe" | grep -c '^  path [a-z-]*  *yes') of 5 migration paths allowed"
  fi
else
  echo "rig check k: skipped - $(sed -n 's/^  \(guest_memfd mmap  *no.*\)/\1/p' "$probe" | tr -s ' ')"
fi

# (b) the default demo (fault mode auto) migrates with matching digests and a green guest.
t=$(clock)
if ! "$bin" demo --memory 32M >"$out" 2>"$err"; then flunk "b (demo, default fault mode)" "exit status $?"
elif ! grep -q "fault mode $auto (auto: " "$out"; then flunk "b (demo, default fault mode)" "the report does not name the mode auto picked ($auto) and why"
else pass "b (demo --memory 32M, default fault mode)" "$(took "$t") s in fault mode $auto"
fi

# (c)-(e) vcpu-exit cannot work with TDP (without KVM Userfault): refused with the reason before anything starts.
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

# (f)-(h) on a kernel with KVM Userfault, vcpu-exit works through it instead of being refused.
if [ "$userfault" = yes ]; then
  t=$(clock)
  if [ "$mechanism" != kvm-userfault ] || [ "$auto" != vcpu-exit ]; then
    flunk "f (KVM Userfault kernel: vcpu-exit via kvm-userfault)" "KVM_MEM_USERFAULT is accepted, but the probe says mechanism '$mechanism', auto '$auto'"
  else pass "f (KVM Userfault kernel: vcpu-exit via kvm-userfault, auto picks it)"
  fi
  t=$(clock)
  if ! "$bin" bench demand-paging --mode vcpu-exit --vcpus 2 --mem-per-vcpu 4 --json >"$out" 2>"$err"; then
    flunk "g (bench demand-paging --mode vcpu-exit on KVM Userfault)" "exit status $?"
  elif ! has '"vcpu_exit_via":"kvm-userfault"' || ! has '"uffd_fallback_faults":0[,}]' || ! has '"bad_pages":0[,}]' \
       || ! has '"checksum_failures":0[,}]'; then
    flunk "g (bench demand-paging --mode vcpu-exit on KVM Userfault)" "not every page verified through KVM Userfault exits"
  else pass "g (bench demand-paging --mode vcpu-exit, 2 vCPUs x 4 MiB)" "$(took "$t") s; every page verified; $(sed -n 's/.*"pages_per_sec":\([0-9]*\).*/\1/p' "$out") pages/s; all faults KVM Userfault exits"
  fi
  t=$(clock)
  # The stream waits for the first demand page: a vCPU must take a KVM Userfault exit
  # whatever the timing (with a fast stream, 32 MiB could all arrive before any vCPU ran).
  if ! "$bin" demo --memory 32M --fault-mode vcpu-exit --precopy-rounds 0 --postcopy always --workload dirtier --json \
      --inject-hold-stream-until-demand-pages 1 >"$out" 2>"$err"; then
    flunk "h (demo --fault-mode vcpu-exit, post-copy on KVM Userfault)" "exit status $?"
  elif ! grep -q '"vcpu_exit_via":"kvm-userfault"' "$out" || ! grep -q '"digest_match":true' "$out" || ! grep -q '"guest_check":true' "$out"; then
    flunk "h (demo --fault-mode vcpu-exit, post-copy on KVM Userfault)" "no digest match / green guest through kvm-userfault"
  elif grep -q '"vcpu_exit_faults":0[,}]' "$out"; then
    flunk "h (demo --fault-mode vcpu-exit, post-copy on KVM Userfault)" "no vCPU took a KVM Userfault exit"
  else pass "h (demo --fault-mode vcpu-exit --postcopy always, 32 MiB)" "$(took "$t") s; digest match, guest green; $(sed -n 's/.*"vcpu_exit_faults":\([0-9]*\).*/\1/p' "$out") faults as KVM Userfault exits"
  fi
fi

# (i)-(j) a guest_memfd VM (KVM_X86_SW_PROTECTED_VM): pre-copy with userfaultfd write-protect
#     as the dirty log, then post-copy in the auto fault mode (userfaultfd; KVM Userfault on
#     its kernel); private pages refused before anything starts, naming guest_memfd mmap.
if "$bin" probe 2>/dev/null | grep -q "^  path stop-and-copy .*yes"; then
  t=$(clock)
  if ! "$bin" demo --vm-type sw-protected --memory 16M --vcpus 1 --json >"$out" 2>"$err"; then
    flunk "i (demo --vm-type sw-protected)" "exit status $?"
  elif ! grep -q '"digest_match":true' "$out" || ! grep -q '"guest_check":true' "$out" || ! grep -q '"precopy_pages":[1-9]' "$out"; then
    flunk "i (demo --vm-type sw-protected)" "no digest match / green guest / pre-copy"
  else pass "i (demo --vm-type sw-protected, 16 MiB)" "$(took "$t") s; path $(sed -n 's/.*"migration_path":"\([a-z-]*\)".*/\1/p' "$out"), digest match, guest green"
  fi
  t=$(clock)
  "$bin" demo --vm-type sw-protected --memory 16M --vcpus 1 --private-pages 8 --json >"$out" 2>"$err"; rc=$?
  if [ $rc -ne 5 ]; then flunk "j (private pages refused)" "exit status $rc, expected 5"
  elif ! grep -qF "guest_memfd mmap (GUEST_MEMFD_FLAG_MMAP)" "$err"; then flunk "j (private pages refused)" "stderr does not name guest_memfd mmap"
  elif grep -q "destination pid" "$out"; then flunk "j (private pages refused)" "it started before refusing"
  else pass "j (demo --private-pages 8 refused)" "$(took "$t") s; exit 5 before starting"
  fi
else
  echo "rig check i: skipped - no KVM_X86_SW_PROTECTED_VM"
fi

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

rm -f "$out" "$err" "$probe"
echo "rig checks: $failed failed, $(took "$begin") s inside the rig"
exit $failed
