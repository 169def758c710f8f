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
artifacts="$out/artifacts"
mkdir -p "$out" "$artifacts"

# The toolchain's clang ships the libFuzzer runtime; say so plainly if this one does not.
if ! ls "$(dirname "$(command -v swiftc)")"/../lib/clang/*/lib/linux/libclang_rt.fuzzer-*.a >/dev/null 2>&1; then
  echo "fuzz: this Swift toolchain has no libFuzzer runtime (libclang_rt.fuzzer); use a swift.org Linux toolchain" >&2
  exit 2
fi

# ASan plus Swift's own checks: the codec is compiled without optimisation so the
# standard library's debug bounds checks on unsafe buffer pointers stay in.
echo "fuzz: building $binary"
build_core "$out/core" -Onone -sanitize=fuzzer,address
build_tool "$out/core" "$binary" fuzz/WireDecoderFuzz/*.swift -- \
  -O -parse-as-library -sanitize=fuzzer,address -use-ld=lld

work="$(mktemp -d "${TMPDIR:-/tmp}/faultline-fuzz.XXXXXX")"
trap 'rm -rf "$work"' EXIT
cp fuzz/corpus/wire/* "$work/"

echo "fuzz: running for ${seconds}s on a copy of fuzz/corpus/wire ($(ls "$work" | wc -l) seeds); findings go to $artifacts/"
status=0
ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=0}" "$binary" "$work" \
  -max_total_time="$seconds" -max_len=65536 -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=1024 \
  -artifact_prefix="$artifacts/" -print_final_stats=1 "$@" || status=$?

if [ "$status" -ne 0 ]; then
  echo "fuzz: FAILED (libFuzzer exit status $status). The failing input:" >&2
  ls -t "$artifacts"/crash-* "$artifacts"/timeout-* "$artifacts"/oom-* "$artifacts"/leak-* 2>/dev/null | head -1 | sed 's/^/  /' >&2
  echo "fuzz: reproduce with: $binary <that file>" >&2
  exit 1
fi
echo "fuzz: no findings in ${seconds}s"
