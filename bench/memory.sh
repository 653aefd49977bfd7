#!/usr/bin/env bash
# Memory benchmark (issue 15): lorad_engine::memory's predicted peak against the measured peak RSS of
# real training runs, one table.
#
#   bench/memory.sh [core|all] [STEPS]      (default: core, 2 optimizer steps per run)
#
# Each run is engine/examples/peak.rs: the worker's allocator settings, `Trainer::open` on a generated
# JSONL dataset (every micro-batch batch x seq tokens), STEPS steps, `finish`; the peak is the high-water
# mark of the resident size (VmHWM) over loading, the steps and finish. LoRA r 16, alpha 32 on q,k,v,o,
# dropout 0 unless the row says; f32 (base widened at load: LORAD_MEMORY_BASE=stored keeps it as
# stored; no gradient checkpointing); CPU; RAYON_NUM_THREADS=2 (LORAD_MEMORY_THREADS).
# core: the tiny fixture (4 x 64), a random 162M Llama in f32 safetensors (8 x 128), SmolLM2-135M-Instruct
# from GGUF Q4_1 (4 x 256), a random Llama of TinyLlama-1.1B's shape in f32 safetensors (1 x 128).
# all adds: the 162M model with LoRA dropout 0.05 (4 x 128), and the 1.1B shape in bf16 safetensors at
# 1 x 128 (the loader is the peak) and 4 x 512 (the step is; about 5 minutes on 2 cores).
# Needs cargo and bench/.venv (torch, safetensors; made by bench/speed.sh). The 1.1B models take 4.4 and
# 2.2 GB of disk and the runs up to ~12 GB of memory. JSON, logs and the table go to bench/out/memory/.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
which="${1:-core}"
steps="${2:-2}"
threads="${LORAD_MEMORY_THREADS:-2}"
out="$here/out/memory"
models="$out/models"
mkdir -p "$models"
case "$which" in core | all) ;; *) echo "usage: $0 [core|all] [STEPS]" >&2; exit 2 ;; esac

py="$here/.venv/bin/python"
[ -x "$py" ] || { echo "no $py: run bench/speed.sh once (it makes the venv)" >&2; exit 1; }

echo "== building the peak example" >&2
(cd "$repo" && cargo build --release -q -p lorad-engine --example peak)
peak="${CARGO_TARGET_DIR:-$repo/target}/release/examples/peak"

rows=()
run() {
  local name=$1 model=$2 batch=$3 seq=$4 dropout=$5
  shift 5
  local json="$out/$name.json"
  echo "== $name: $batch x $seq (log: $out/$name.log)" >&2
  RAYON_NUM_THREADS=$threads "$peak" --model "$model" --batch "$batch" --seq "$seq" --steps "$steps" \
    --dropout "$dropout" --base-weights "${LORAD_MEMORY_BASE:-f32}" --gradient-checkpointing off \
    --json "$json" "$@" 2> "$out/$name.log" || { tail -20 "$out/$name.log" >&2; exit 1; }
  rows+=("$name" "$json")
}

run tiny "$models/tiny" 4 64 0 --make-tiny-model
run llama162m "$("$py" "$here/speed/make_llama110m.py" "$models/llama162m" --seed 0)" 8 128 0
run smollm2 "$("$here/fetch_smollm2.sh")" 4 256 0
run llama1b "$("$py" "$here/memory/make_llama1b.py" "$models/llama1b" --seed 0)" 1 128 0
if [ "$which" = all ]; then
  run llama162m-dropout "$models/llama162m" 4 128 0.05
  bf16="$("$py" "$here/memory/make_llama1b.py" "$models/llama1b-bf16" --seed 0 --dtype bf16)"
  run llama1b-bf16 "$bf16" 1 128 0
  run llama1b-bf16-4x512 "$bf16" 4 512 0
fi

commit="$(cd "$repo" && git rev-parse --short HEAD)$(cd "$repo" && [ -z "$(git status --porcelain)" ] || echo "+uncommitted")"
python3 "$here/memory/report.py" --commit "$commit" --threads "$threads" "${rows[@]}" | tee "$out/table.md"
