#!/usr/bin/env bash
# Regenerates the fuzzer's seed corpus, fuzz/corpus/wire/, from real frames made by
# WireEncoder (fuzz/CorpusGenerator/main.swift). Run after changing the wire format or
# the generator, and commit the result.
set -euo pipefail
cd "$(dirname "$0")/.."
source fuzz/build.sh

out="$FUZZ_ROOT/.build/fuzz"
build_core "$out/core-plain" -O
build_tool "$out/core-plain" "$out/corpus-generator" fuzz/CorpusGenerator/main.swift -- -O
rm -f fuzz/corpus/wire/*
"$out/corpus-generator" fuzz/corpus/wire
