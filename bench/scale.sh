#!/usr/bin/env bash
# Scale benchmark (issue 17): peak RSS and tokens/s of a LoRA step on models of real sizes, lorad against
# PyTorch + PEFT on the same shapes, in one run and one table.
#
#   bench/scale.sh [quick|full]          (default: quick)
#
# Models (bench/scale/make_model.py, written once under bench/out/scale/models/): random weights with the
# shapes of Llama-3.2-1B (1.24B parameters, tied), Llama-3.2-3B (3.21B, tied) and Llama-3.1-8B (8.03B),
# the full 128256-token vocabulary, as HF safetensors in bf16 and as GGUF with Q4_K matrices.
# Rows, for each shape and batch x seq:
#   lorad (engine/examples/peak.rs, the worker's Trainer): base widened to f32 at load (from the bf16 file),
#     kept bf16, kept Q4_K (from the GGUF); each with gradient checkpointing off and on.
#   PyTorch + PEFT (bench/scale/peft_step.py, the bf16 file): bf16 base and f32 base (widened at load);
#     checkpointing off, and in `full` also on. f32 rows: one warm-up step, then the timed ones; bf16 rows
#     no warm-up. With torch 2.15 on this CPU (no bf16 instructions) one bf16 step of the 1B shape at
#     1 x 512 had not finished after 25 min (on a loaded machine); the suspect is the LM head's input
#     gradient, a bf16 matmul summing over the 128256-wide vocabulary (alone at 128 x 512 tokens x hidden:
#     68 s in bf16, 0.3 s in f32). So bf16 rows dominate the run's time; LORAD_SCALE_TIMEOUT bounds each.
# quick: the 1B shape at 1 x 512 (6 lorad rows, 2 PEFT rows; the lorad and PEFT f32 rows ~10 min on 2
#     cores, PEFT bf16 possibly far longer, see above).
# full: 1B, 3B and 8B at 1 x 512 and 4 x 512, and 1B at 1 x 2048 (sequence growth); many hours.
# A row whose predicted peak is over LORAD_SCALE_LIMIT_GB (default 21) is skipped and says so: lorad's
# prediction is lorad_engine::memory's (peak.rs --estimate-only), PEFT's a rough count (peft_step.py
# --estimate-only). The 8B bf16 file (16 GB) is written only with LORAD_SCALE_8B_BF16=1 and 20 GB of free
# disk; without it the 8B rows that need it say so.
# Runs of lorad and PEFT alternate within a shape and batch, so load drift on the machine hits both.
# Knobs: LORAD_SCALE_THREADS (2), LORAD_SCALE_STEPS (lorad optimizer steps, the first untimed; default 3
# in quick, 2 in full), LORAD_SCALE_PEFT_STEPS (timed PEFT steps; 1),
# LORAD_SCALE_SHAPES / LORAD_SCALE_TOKENS to override the lists (e.g. "llama3.2-3b", "1x512 4x512"),
# LORAD_SCALE_TIMEOUT (seconds per run, 7200).
# Needs cargo and bench/.venv (torch, transformers, peft, safetensors, gguf). Disk: 1B 2.5 + 0.7 GB,
# 3B 6.4 + 1.7 GB, 8B Q4_K 4.5 GB. Logs, JSON and table.md go to bench/out/scale/.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
mode="${1:-quick}"
case "$mode" in quick | full) ;; *) echo "usage: $0 [quick|full]" >&2; exit 2 ;; esac
threads="${LORAD_SCALE_THREADS:-2}"
limit_gb="${LORAD_SCALE_LIMIT_GB:-21}"
run_timeout="${LORAD_SCALE_TIMEOUT:-7200}"
if [ "$mode" = quick ]; then
  shapes="${LORAD_SCALE_SHAPES:-llama3.2-1b}"
  tokens="${LORAD_SCALE_TOKENS:-1x512}"
  steps="${LORAD_SCALE_STEPS:-3}"
  peft_steps="${LORAD_SCALE_PEFT_STEPS:-1}"
  peft_ckpt=(off)
else
  shapes="${LORAD_SCALE_SHAPES:-llama3.2-1b llama3.2-3b llama3.1-8b}"
  tokens="${LORAD_SCALE_TOKENS:-1x512 4x512}"
  steps="${LORAD_SCALE_STEPS:-2}"
  peft_steps="${LORAD_SCALE_PEFT_STEPS:-1}"
  peft_ckpt=(off on)
fi
command="bench/scale.sh $mode"
for v in LORAD_SCALE_THREADS LORAD_SCALE_LIMIT_GB LORAD_SCALE_SHAPES LORAD_SCALE_TOKENS LORAD_SCALE_STEPS \
  LORAD_SCALE_PEFT_STEPS LORAD_SCALE_8B_BF16; do
  [ -z "${!v:-}" ] || command="$v=\"${!v}\" $command"
done
echo "== $command" >&2

out="$here/out/scale"
models="$out/models"
mkdir -p "$models"
py="$here/.venv/bin/python"
[ -x "$py" ] || { echo "no $py: run bench/speed.sh once (it makes the venv)" >&2; exit 1; }

echo "== building the peak example" >&2
(cd "$repo" && cargo build --release -q -p lorad-engine --example peak)
peak="${CARGO_TARGET_DIR:-$repo/target}/release/examples/peak"

manifest="$out/manifest.tsv"
: > "$manifest"
row() { printf '%s\t' "$@" | sed 's/\t$//' >> "$manifest"; echo >> "$manifest"; }
gb() { python3 -c "import json,sys; print(round(json.load(open(sys.argv[1]))['estimate_mb']['total'] / 1e3, 1))" "$1"; }
over() { python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) > float(sys.argv[2]) else 1)" "$1" "$limit_gb"; }
free_gb() { df -Pk "$models" | awk 'NR == 2 { print int($4 / 1e6) }'; }

model_bf16() {
  local shape=$1 dir="$models/$1-bf16"
  if [ "$shape" = llama3.1-8b ] && [ ! -f "$dir/config.json" ]; then
    if [ "${LORAD_SCALE_8B_BF16:-0}" != 1 ] || [ "$(free_gb)" -lt 20 ]; then return 1; fi
  fi
  echo "== writing $dir" >&2
  "$py" "$here/scale/make_model.py" "$shape" bf16 "$dir" > /dev/null
  echo "$dir"
}
model_q4k() {
  local file="$models/$1-q4k.gguf"
  echo "== writing $file" >&2
  "$py" "$here/scale/make_model.py" "$1" q4k "$file" > /dev/null
  echo "$file"
}

# One lorad run: shape base held ckpt batch seq model.
lorad() {
  local shape=$1 base=$2 held=$3 ckpt=$4 batch=$5 seq=$6 model=$7
  local name="$shape-$base-lorad-$held-ckpt$ckpt-${batch}x$seq"
  local json="$out/$name.json" log="$out/$name.log"
  local flags=(--model "$model" --batch "$batch" --seq "$seq" --base-weights "$held" --gradient-checkpointing "$ckpt")
  if ! "$peak" "${flags[@]}" --steps 1 --estimate-only --json "$out/$name.estimate.json" 2> "$log"; then
    tail -5 "$log" >&2
    row "$shape" "$base" lorad "$held" "$ckpt" "$batch" "$seq" fail "$log"
    return
  fi
  local est; est="$(gb "$out/$name.estimate.json")"
  if over "$est"; then
    echo "== $name: skipped, predicted $est GB" >&2
    row "$shape" "$base" lorad "$held" "$ckpt" "$batch" "$seq" skip "predicted $est GB > $limit_gb GB"
    return
  fi
  echo "== $name (predicted $est GB; log: $log)" >&2
  local rc=0
  RAYON_NUM_THREADS=$threads timeout "$run_timeout" "$peak" "${flags[@]}" --steps "$steps" --json "$json" 2>> "$log" || rc=$?
  if [ $rc = 0 ]; then
    tail -1 "$log" >&2
    row "$shape" "$base" lorad "$held" "$ckpt" "$batch" "$seq" ok "$json"
  elif [ $rc = 124 ]; then
    row "$shape" "$base" lorad "$held" "$ckpt" "$batch" "$seq" skip "timed out after $run_timeout s"
  else
    tail -5 "$log" >&2
    row "$shape" "$base" lorad "$held" "$ckpt" "$batch" "$seq" fail "$log"
  fi
}

# One PEFT run: shape dtype ckpt batch seq model.
peft() {
  local shape=$1 dtype=$2 ckpt=$3 batch=$4 seq=$5 model=$6
  local name="$shape-bf16-peft-$dtype-ckpt$ckpt-${batch}x$seq"
  local json="$out/$name.json" log="$out/$name.log"
  local flags=(--model "$model" --dtype "$dtype" --batch "$batch" --seq "$seq" --threads "$threads")
  [ "$ckpt" = off ] || flags+=(--checkpointing)
  if ! "$py" "$here/scale/peft_step.py" "${flags[@]}" --estimate-only --json "$out/$name.estimate.json" 2> "$log"; then
    tail -5 "$log" >&2
    row "$shape" bf16 peft "$dtype" "$ckpt" "$batch" "$seq" fail "$log"
    return
  fi
  local est; est="$(gb "$out/$name.estimate.json")"
  if over "$est"; then
    echo "== $name: skipped, predicted $est GB" >&2
    row "$shape" bf16 peft "$dtype" "$ckpt" "$batch" "$seq" skip "predicted ~$est GB > $limit_gb GB"
    return
  fi
  echo "== $name (predicted ~$est GB; log: $log)" >&2
  # A bf16 step takes minutes here and its first is no slower than the next (1.2 GB test model: 66.2,
  # 66.4, 65.6 s), so bf16 rows have no warm-up step.
  local warmup=1 rc=0
  [ "$dtype" = f32 ] || warmup=0
  timeout "$run_timeout" "$py" "$here/scale/peft_step.py" "${flags[@]}" --warmup "$warmup" --steps "$peft_steps" \
    --json "$json" 2>> "$log" || rc=$?
  if [ $rc = 0 ]; then
    tail -1 "$log" >&2
    row "$shape" bf16 peft "$dtype" "$ckpt" "$batch" "$seq" ok "$json"
  elif [ $rc = 124 ]; then
    row "$shape" bf16 peft "$dtype" "$ckpt" "$batch" "$seq" skip "timed out after $run_timeout s"
  else
    tail -5 "$log" >&2
    row "$shape" bf16 peft "$dtype" "$ckpt" "$batch" "$seq" fail "$log"
  fi
}

for shape in $shapes; do
  q4k="$(model_q4k "$shape")"
  bf16="$(model_bf16 "$shape" || true)"
  shape_tokens="$tokens"
  if [ "$mode" = full ] && [ -z "${LORAD_SCALE_TOKENS:-}" ] && [ "$shape" = llama3.2-1b ]; then
    shape_tokens="$tokens 1x2048"
  fi
  for bs in $shape_tokens; do
    batch="${bs%x*}" seq="${bs#*x}"
    # The runs of this shape and batch x seq, lorad's and PEFT's alternating.
    lorad_runs=() peft_runs=()
    for ckpt in off on; do
      lorad_runs+=("bf16 f32 $ckpt" "bf16 stored $ckpt" "q4k stored $ckpt")
    done
    for ckpt in "${peft_ckpt[@]}"; do
      peft_runs+=("f32 $ckpt" "bf16 $ckpt")
    done
    i=0 j=0
    while [ $i -lt ${#lorad_runs[@]} ] || [ $j -lt ${#peft_runs[@]} ]; do
      if [ $i -lt ${#lorad_runs[@]} ]; then
        read -r base held ckpt <<< "${lorad_runs[$i]}"
        model="$q4k"; [ "$base" = q4k ] || model="$bf16"
        if [ -z "$model" ]; then
          row "$shape" "$base" lorad "$held" "$ckpt" "$batch" "$seq" skip "no bf16 file (16 GB: LORAD_SCALE_8B_BF16=1 and 20 GB free disk)"
        else
          lorad "$shape" "$base" "$held" "$ckpt" "$batch" "$seq" "$model"
        fi
        i=$((i + 1))
      fi
      if [ $j -lt ${#peft_runs[@]} ]; then
        read -r dtype ckpt <<< "${peft_runs[$j]}"
        if [ -z "$bf16" ]; then
          row "$shape" bf16 peft "$dtype" "$ckpt" "$batch" "$seq" skip "no bf16 file (16 GB: LORAD_SCALE_8B_BF16=1 and 20 GB free disk)"
        else
          peft "$shape" "$dtype" "$ckpt" "$batch" "$seq" "$bf16"
        fi
        j=$((j + 1))
      fi
    done
  done
done

commit="$(cd "$repo" && git rev-parse --short HEAD)$(cd "$repo" && [ -z "$(git status --porcelain -- engine kernels schema)" ] || echo "+uncommitted engine changes")"
machine="$(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), $(awk '/MemTotal/ { printf "%.0f GB", $2 / 1e6 }' /proc/meminfo) RAM"
"$py" "$here/scale/report.py" "$manifest" --command "$command" --commit "$commit" --threads "$threads" \
  --machine "$machine" | tee "$out/table.md"
echo "== table: $out/table.md" >&2
