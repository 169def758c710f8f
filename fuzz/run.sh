#!/usr/bin/env bash
# Fuzzes the wire decoder with libFuzzer for SECONDS (default 60) on a scratch copy of
# fuzz/corpus/wire (the committed corpus never grows). Exits non-zero when the fuzzer
# finds a crash, hang or memory blow-up, and prints the file holding the input.
# Extra arguments go to libFuzzer. See docs/fuzzing.md.
#
#   fuzz/run.sh [SECONDS] [libFuzzer flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
source fuzz/build.sh

seconds="${1:-60}"
[ $# -gt 0 ] && shift
case "$seconds" in ''|*[!0-9]*) echo "usage: fuzz/run.sh [SECONDS] [libFuzzer flags...]" >&2; exit 2 ;; esac

out="$FUZZ_ROOT/.build/fuzz"
binary="$out/wire-decoder-fuzz"
artifacts="$out/artifacts/$(date -u +%Y%m%dT%H%M%SZ)-$$"
mkdir -p "$artifacts"

# The toolchain's clang ships the libFuzzer runtime; say so plainly if this one does not.
if ! ls "$(dirname "$(command -v swiftc)")"/../lib/clang/*/lib/linux/libclang_rt.fuzzer-*.a >/dev/null 2>&1; then
  echo "fuzz: this Swift toolchain has no libFuzzer runtime (libclang_rt.fuzzer); use a swift.org Linux toolchain" >&2
  exit 2
fi

# ASan plus Swift's own checks: the codec is optimised but keeps the standard library's
# debug preconditions (-assert-config Debug), among them the bounds checks on unsafe
# buffer pointers, which catch reads past a payload that stay inside the receive buffer.
echo "fuzz: building $binary"
build_core "$out/core" -O -assert-config Debug -sanitize=fuzzer,address
build_tool "$out/core" "$binary" fuzz/WireDecoderFuzz/*.swift -- \
  -O -parse-as-library -sanitize=fuzzer,address -use-ld=lld

work="$(mktemp -d "${TMPDIR:-/tmp}/faultline-fuzz.XXXXXX")"
trap 'rm -rf "$work"' EXIT
cp fuzz/corpus/wire/* "$work/"

echo "fuzz: running for ${seconds}s on a copy of fuzz/corpus/wire ($(ls "$work" | wc -l) seeds); findings go to $artifacts/"
status=0
# A smaller ASan quarantine than the default 256 MiB: the machine is shared.
ASAN_OPTIONS="${ASAN_OPTIONS:-quarantine_size_mb=32}" "$binary" "$work" \
  -max_total_time="$seconds" -max_len=65536 -timeout=10 -rss_limit_mb=1024 -malloc_limit_mb=256 \
  -artifact_prefix="$artifacts/" -print_final_stats=1 "$@" || status=$?

if [ "$status" -ne 0 ]; then
  echo "fuzz: FAILED (libFuzzer exit status $status). The failing input:" >&2
  finding="$(ls -t "$artifacts"/crash-* "$artifacts"/timeout-* "$artifacts"/oom-* "$artifacts"/leak-* \
    "$artifacts"/slow-unit-* 2>/dev/null | head -1 || true)"
  if [ -n "$finding" ]; then
    echo "  $finding ($(wc -c < "$finding") bytes)" >&2
    # .build does not outlive a CI job: the input itself, to paste into a file or a test.
    if [ "$(wc -c < "$finding")" -le 16384 ]; then echo "  base64: $(base64 -w0 "$finding")" >&2; fi
    echo "fuzz: reproduce with: $binary $finding" >&2
  else
    echo "  (libFuzzer saved no input; see its output above)" >&2
  fi
  exit 1
fi
echo "fuzz: no findings in ${seconds}s"
