# Sourced by fuzz/run.sh and fuzz/make-corpus.sh: compiles the wire codec's sources with
# swiftc directly (not SwiftPM, so the package build never needs the fuzzer runtime).
#
#   build_core DIR [swiftc flags...]   FaultlineCore (addresses + Wire/) as a static
#                                      library and module in DIR, CFaultlineCRC beside it
#   build_tool DIR OUT SOURCES... [-- swiftc flags...]
#                                      an executable OUT linked against DIR's core
#
# The codec needs only Addresses.swift, Wire/*.swift and the CRC C module; the rest of
# FaultlineCore (PageBitmap) needs swift-atomics, which a plain swiftc run does not have.

FUZZ_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The clang of the Swift toolchain (it has the libFuzzer and ASan runtimes swiftc links).
FUZZ_CLANG="$(dirname "$(command -v swiftc)")/clang"
CORE_SOURCES=(
  "$FUZZ_ROOT/Sources/FaultlineCore/Addresses.swift"
  "$FUZZ_ROOT"/Sources/FaultlineCore/Wire/*.swift
)

build_core() {
  local dir="$1"; shift
  mkdir -p "$dir/include"
  cp "$FUZZ_ROOT/Sources/CFaultlineCRC/include/faultline_crc.h" "$dir/include/"
  cat > "$dir/include/module.modulemap" <<MAP
module CFaultlineCRC {
  header "faultline_crc.h"
  export *
}
MAP
  "$FUZZ_CLANG" -O2 -c "$FUZZ_ROOT/Sources/CFaultlineCRC/crc.c" -I "$dir/include" -o "$dir/crc.o"
  swiftc -parse-as-library -module-name FaultlineCore -emit-module -emit-module-path "$dir/FaultlineCore.swiftmodule" \
    -emit-library -static -o "$dir/libFaultlineCore.a" -I "$dir/include" -swift-version 5 "$@" "${CORE_SOURCES[@]}"
}

build_tool() {
  local dir="$1" out="$2"; shift 2
  local sources=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do sources+=("$1"); shift; done
  [ "${1:-}" = "--" ] && shift
  swiftc -I "$dir" -I "$dir/include" -L "$dir" -lFaultlineCore "$dir/crc.o" -swift-version 5 "$@" \
    "${sources[@]}" -o "$out"
}
