#!/usr/bin/env bash
# The CUDA check for a lent GPU machine (H100/H200), meant to finish in under 10 minutes:
#
#   1. nvidia-smi: the GPU, its driver and the driver's CUDA version (CUDA_COMPUTE_CAP is read off it);
#   2. lorad built with CUDA: prebuilt with --dist DIR (from `bench/gpu/build.sh --all --tests --dist
#      DIR` on a machine with cargo and PyPI: GPU machines here have neither), else built here by
#      build.sh (with the machine's own nvcc when there is one, else CUDA from PyPI);
#   3. the engine's tests from the CUDA build (note: only `plan_counts_steps_like_the_spec` touches
#      CUDA, through select_device("auto") = cuda:0 in a CUDA build; every other engine test builds its
#      tensors on Device::Cpu, so the suite shows that the CUDA build still computes right on the CPU,
#      not that the GPU path does; steps 4 and 5 do that);
#   4. a CUDA smoke test: `lorad generate` on the tiny model, greedy, cpu vs cuda:0 (same tokens?);
#   5. LoRA training through the daemon on the GPU (`loractl submit ... --set device=cuda:0`), with
#      the daemon's NVML telemetry (`loractl status` devices, the `gpu` field of each metric point,
#      the job's energy);
#   6. PyTorch + PEFT on the same GPU, model, batch, LoRA and steps (bench/speed/torch_speed.py
#      --device cuda);
#   7. one table (also in $LORAD_GPU_OUT/check.md, with the JSON and logs beside it).
#
#   bench/gpu/check.sh [--dist DIR|FILE.tar.xz] [--model PATH] [--steps N] [--warmup N] [--batch B] [--seq S]
#                      [--skip-tests] [--cpu-rehearsal]
#
#   --model PATH     a GGUF file or an HF directory [default: SmolLM2-135M-Instruct's GGUF if
#                    bench/fetch_smollm2.sh already fetched it (bench/out/smollm2) and python has the
#                    `gguf` package, else a random-weight model of SmolLM2-135M's exact shape in HF
#                    layout, made here with torch: a GPU machine here cannot download, and the GGUF
#                    (98 MB) is too big to carry; speed does not depend on the weights' values]
#   --steps/--warmup timed and untimed optimizer steps of each engine [20 / 3]
#   --batch/--seq    batch and sequence length [8 / 512]; LoRA r 16, alpha 32, dropout 0 on q,k,v,o; f32
#   --skip-tests     skip step 3
#   --cpu-rehearsal  for a machine WITHOUT a GPU: every step on the CPU, a 2-layer model, 2 steps; needs
#                    --dist (or a build) and a stub libcuda.so.1 (bench/gpu/build.sh makes one). It checks
#                    the script's plumbing only and measures nothing.
#
# Environment: LORAD_GPU_OUT (results; default bench/out/gpu), PYTHON (a python with torch, transformers,
# peft, safetensors; default python3), LORAD_GPU_TEST_TIMEOUT (s, default 240), LORAD_GPU_TRAIN_TIMEOUT
# (s, default 240). On a lent machine: `LORAD_GPU_OUT=$OUT bench/gpu/check.sh --dist bench/out/gpu-dist.tar.xz`.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

dist="" model="" steps=20 warmup=3 batch=8 seq=512 skip_tests=0 rehearsal=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dist) dist="$(realpath -e "${2:?--dist needs a directory or a .tar.xz}")" || exit 2; shift ;;
    --model) model="${2:?--model needs a path}"; shift ;;
    --steps) steps="${2:?}"; shift ;;
    --warmup) warmup="${2:?}"; shift ;;
    --batch) batch="${2:?}"; shift ;;
    --seq) seq="${2:?}"; shift ;;
    --skip-tests) skip_tests=1 ;;
    --cpu-rehearsal) rehearsal=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$rehearsal" = 1 ]; then
  steps=2 warmup=1 batch=2 seq=32
fi
device=cuda:0
[ "$rehearsal" = 1 ] && device=cpu

PY="${PYTHON:-python3}"
out="${LORAD_GPU_OUT:-$repo/bench/out/gpu}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
work="$(mktemp -d /tmp/lorad-gpu-check-XXXXXX)"
results="$out/results.tsv"   # step <TAB> PASS|FAIL|SKIP|INFO <TAB> detail
: > "$results"
started=$(date +%s)

note() { echo "== [$(( $(date +%s) - started ))s] $*" >&2; }
record() { printf '%s\t%s\t%s\n' "$1" "$2" "$(tr '\t\n' '  ' <<< "$3")" >> "$results"; [ "$2" != FAIL ] || echo "check.sh: FAIL: $1: $3" >&2; }

daemon_pid=""
ldconf=""
# shellcheck disable=SC2317  # run by the EXIT trap
cleanup() {
  if [ -n "$daemon_pid" ]; then kill "$daemon_pid" 2> /dev/null || true; wait "$daemon_pid" 2> /dev/null || true; fi
  if [ -n "$ldconf" ]; then rm -f "$ldconf"; ldconfig 2> /dev/null || true; fi
}
trap cleanup EXIT

# The table, printed however the script ends (after a failure too).
report() {
  "$PY" - "$results" "$out" <<'PY' | tee "$out/check.md" || cat "$results"
import json, sys
from pathlib import Path
results, out = Path(sys.argv[1]), Path(sys.argv[2])
rows = [l.split("\t", 2) for l in results.read_text().splitlines() if l.strip()]
print("| check | result | detail |")
print("|---|---|---|")
for step, status, detail in rows:
    print(f"| {step} | {status} | {detail} |")
speed = out / "speed.json"
if speed.exists():
    s = json.loads(speed.read_text())
    print()
    print(f"Speed: {s['what']}")
    print()
    print("| engine | device | tokens/s | ms/step (median) | GPU memory peak (MiB) | GPU util (mean %) | GPU power (mean W) |")
    print("|---|---|---|---|---|---|---|")
    fmt = lambda v, f: "n/a" if v is None else format(v, f)
    for r in s["rows"]:
        print(f"| {r['engine']} | {r['device']} | {fmt(r.get('tokens_per_s'), '.0f')} | {fmt(r.get('step_ms'), '.1f')} | "
              f"{fmt(r.get('gpu_mem_mb'), '.0f')}{'' if r.get('gpu_mem_mb') is None else ' ' + r.get('gpu_mem_how', '')} | {fmt(r.get('gpu_util_pct'), '.0f')} | {fmt(r.get('gpu_power_w'), '.0f')} |")
    if s.get("ratio") is not None:
        print(f"\nlorad / PyTorch tokens/s: {s['ratio']:.2f}x")
fails = sum(1 for _, st, _ in rows if st == "FAIL")
print(f"\n{sum(1 for _, st, _ in rows if st == 'PASS')} passed, {fails} failed")
PY
}
finish() {
  echo >&2
  report
  echo "(results in $out; work dir $work)" >&2
  if grep -q "	FAIL	" "$results"; then exit 1; fi
  exit 0
}
fatal() { record "$1" FAIL "$2"; finish; }

# ---------------------------------------------------------------- 1. the GPU
if [ "$rehearsal" = 1 ]; then
  record "GPU" INFO "none: --cpu-rehearsal (every step on the CPU; nothing below is a GPU measurement)"
else
  command -v nvidia-smi > /dev/null || fatal "GPU" "no nvidia-smi on PATH: this is not a GPU machine, or its NVIDIA driver is not installed (use --cpu-rehearsal to rehearse the script without one)"
  nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || fatal "GPU" "nvidia-smi failed: $(tail -3 "$out/nvidia-smi.txt")"
  cat "$out/nvidia-smi.txt" >&2
  gpu="$(nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader -i 0)" ||
    fatal "GPU" "nvidia-smi --query-gpu failed"
  driver_cuda="$(sed -n 's/.*CUDA Version: *\([0-9.]*\).*/\1/p' "$out/nvidia-smi.txt" | head -1)"
  cap="$(cut -d, -f4 <<< "$gpu" | tr -d ' .')"
  export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-$cap}"
  record "GPU" INFO "$gpu; driver's CUDA $driver_cuda; CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"
  # The PyPI build is CUDA 13.0 (PTX ISA 9.0, libcudart.so.13): the driver must speak CUDA >= 13.0.
  if [ -n "$driver_cuda" ] && [ "${driver_cuda%%.*}" -lt 13 ]; then
    record "GPU" FAIL "the driver supports CUDA $driver_cuda, but lorad is built with CUDA 13.0 (its PTX and libcudart.so.13 need a CUDA 13 driver, >= 580): update the driver, or build with the machine's own CUDA 12 (build.sh --system-cuda)"
  fi
fi

# ---------------------------------------------------------------- 2. lorad with CUDA
bin="$work/dist"
if [ -n "$dist" ]; then
  if [ -f "$dist" ]; then
    mkdir -p "$work/unpacked"
    tar -xJf "$dist" -C "$work/unpacked" || fatal "build" "could not unpack $dist (xz and tar needed)"
    [ -d "$work/unpacked/dist" ] || fatal "build" "$dist holds no dist/ directory: make it with build.sh --all --tests --dist FILE.tar.xz"
    dist="$work/unpacked/dist"
  fi
  bin="$dist"
  [ -f "$dist/BUILD-INFO" ] && record "build" INFO "prebuilt in $dist: $(cat "$dist/BUILD-INFO")"
elif command -v cargo > /dev/null; then
  flags=(--all --tests --dist "$bin")
  if command -v nvcc > /dev/null || [ -x /usr/local/cuda/bin/nvcc ]; then flags=(--system-cuda "${flags[@]}"); fi
  note "building lorad with CUDA: bench/gpu/build.sh ${flags[*]}"
  t0=$(date +%s)
  if "$here/build.sh" "${flags[@]}" > "$out/build.log" 2>&1; then
    record "build" PASS "bench/gpu/build.sh ${flags[*]} in $(( $(date +%s) - t0 )) s"
  else
    tail -30 "$out/build.log" >&2
    fatal "build" "bench/gpu/build.sh ${flags[*]} failed after $(( $(date +%s) - t0 )) s (log: $out/build.log): $(grep -m1 -E 'error(\[|:)' "$out/build.log" || tail -1 "$out/build.log")"
  fi
else
  fatal "build" "no --dist DIR and no cargo here: build on a machine with cargo and PyPI with 'bench/gpu/build.sh --all --tests --dist bench/out/gpu-dist.tar.xz' and bring bench/out/gpu-dist.tar.xz along"
fi
lorad="$bin/lorad" loractl="$bin/loractl"
for f in "$lorad" "$loractl"; do [ -x "$f" ] || fatal "build" "$f is missing (build with: bench/gpu/build.sh --all --tests --dist DIR)"; done
ls "$bin"/liblorad_*.so > /dev/null 2>&1 || fatal "build" "no liblorad_*.so plugins in $bin (the templates plugin is needed to submit): build.sh --all"

# The libraries lorad links (libcuda.so.1 from the driver; cudart, cuBLAS, cuBLASLt, cuRAND, NVRTC of
# CUDA 13) and the NVML it opens. The daemon starts its workers with a clean environment (no
# LD_LIBRARY_PATH: daemon/src/identity.rs), so a library only LD_LIBRARY_PATH finds is lost to the
# worker: such directories go into the loader's cache for the run (ld.so.conf.d, as root; removed at
# exit), or into a copy of the binary's RUNPATH (patchelf).
candidates=()
IFS=: read -r -a ldp <<< "${LD_LIBRARY_PATH:-}"
candidates+=("${ldp[@]}")
for r in "${CUDA_ROOT:-}" "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda/targets/x86_64-linux /usr/local/nvidia; do
  [ -n "$r" ] && candidates+=("$r/lib64" "$r/lib")
done
for d in "$repo"/bench/.venv-cuda/lib/python3*/site-packages/nvidia/cu13/lib; do candidates+=("$d"); done
while read -r d; do candidates+=("$d"); done < <("$PY" -c '
import os
try:
    import nvidia
    for p in nvidia.__path__:
        for sub in ("cu13/lib", "cublas/lib", "cuda_runtime/lib", "cuda_nvrtc/lib", "curand/lib"):
            if os.path.isdir(os.path.join(p, sub)):
                print(os.path.join(p, sub))
except Exception:
    pass' 2> /dev/null || true)
if [ "$rehearsal" = 1 ]; then
  # No driver here: the stub libcuda.so (soname libcuda.so.1) that build.sh linked against.
  mkdir -p "$work/stub"
  stub="$(ls "$repo"/bench/.venv-cuda/lorad-cuda-link/lib/stubs/libcuda.so 2> /dev/null || true)"
  [ -n "$stub" ] || fatal "libraries" "--cpu-rehearsal needs the stub libcuda.so from bench/gpu/build.sh (bench/.venv-cuda/lorad-cuda-link/lib/stubs)"
  ln -sfn "$stub" "$work/stub/libcuda.so.1"
  candidates=("$work/stub" "${candidates[@]}")
fi
in_cache() { ldconfig -p 2> /dev/null | grep -q "[[:space:]]$1 "; }
find_lib() { local d; for d in "${candidates[@]}"; do [ -n "$d" ] && [ -e "$d/$1" ] && { echo "$d"; return 0; }; done; return 1; }
needed="$(readelf -d "$lorad" 2> /dev/null | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p')" ||
  fatal "libraries" "readelf -d $lorad failed (binutils missing?)"
grep -q '^libcuda\.so' <<< "$needed" || fatal "build" "$lorad does not link libcuda: it was built without CUDA (--features cuda)"
extra_dirs=() missing=()
for so in $needed libnvidia-ml.so.1; do
  case "$so" in libc.so*|libm.so*|libgcc_s.so*|libstdc++.so*|ld-linux*|libdl.so*|libpthread.so*|librt.so*) continue ;; esac
  in_cache "$so" && continue
  if d="$(find_lib "$so")"; then
    case " ${extra_dirs[*]} " in *" $d "*) ;; *) extra_dirs+=("$d") ;; esac
  elif [ "$so" = libnvidia-ml.so.1 ]; then
    [ "$rehearsal" = 1 ] || record "libraries" FAIL "libnvidia-ml.so.1 (NVML, the driver's) not found: the daemon will see no GPU"
  else
    missing+=("$so")
  fi
done
[ "${#missing[@]}" -eq 0 ] || fatal "libraries" "not found: ${missing[*]} (searched the loader cache and ${candidates[*]}); lorad needs the NVIDIA driver's libcuda.so.1 and CUDA 13's cudart, cuBLAS, cuRAND and NVRTC"
LDP="$(IFS=:; echo "${extra_dirs[*]}")"
if [ "${#extra_dirs[@]}" -gt 0 ]; then
  if command -v patchelf > /dev/null; then
    mkdir -p "$work/bin"
    cp "$lorad" "$work/bin/lorad" && patchelf --set-rpath "$LDP" "$work/bin/lorad"
    cp "$bin"/liblorad_*.so "$work/bin/"
    lorad="$work/bin/lorad"
    record "libraries" INFO "not in the loader cache: RUNPATH $LDP set on a copy of lorad (patchelf)"
  elif [ "$rehearsal" = 1 ]; then
    # Never a stub libcuda.so.1 in the loader cache of a machine people work on.
    fatal "libraries" "--cpu-rehearsal needs patchelf (apt-get install patchelf) to point a copy of lorad at $LDP"
  elif [ "$(id -u)" = 0 ] && [ -d /etc/ld.so.conf.d ] && [ -w /etc/ld.so.conf.d ]; then
    ldconf=/etc/ld.so.conf.d/zz-lorad-gpu-check.conf
    printf '%s\n' "${extra_dirs[@]}" > "$ldconf"
    ldconfig || fatal "libraries" "ldconfig failed after writing $ldconf"
    record "libraries" INFO "not in the loader cache: added $LDP with $ldconf for this run (removed at exit)"
  else
    fatal "libraries" "$LDP are not in the loader cache, and the daemon's workers do not inherit LD_LIBRARY_PATH: run as root, install patchelf, or add them to /etc/ld.so.conf.d"
  fi
fi
export LD_LIBRARY_PATH="${LDP}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
"$lorad" --version > /dev/null 2> "$work/version.err" || fatal "libraries" "$lorad does not start: $(head -3 "$work/version.err")"

# ---------------------------------------------------------------- 3. the engine's tests
if [ "$skip_tests" = 1 ]; then
  record "engine tests" SKIP "--skip-tests"
else
  tests=()
  if [ -d "$bin/tests" ]; then for t in "$bin"/tests/*; do [ -x "$t" ] && tests+=("$t"); done; fi
  if [ "${#tests[@]}" -eq 0 ]; then
    record "engine tests" FAIL "no test binaries in $bin/tests (build.sh --tests --dist DIR puts them there)"
  else
    note "engine tests (${#tests[@]} binaries, timeout ${LORAD_GPU_TEST_TIMEOUT:-240} s)"
    t0=$(date +%s) ok=1
    : > "$out/engine-tests.log"
    skip=()
    if [ "$rehearsal" = 1 ]; then
      # In a CUDA build select_device("auto") is cuda:0 whether or not a GPU can be opened (candle's
      # cuda_is_available() is cfg!(feature = "cuda")): with the stub driver this test cannot pass.
      skip=(--skip plan_counts_steps_like_the_spec)
      record "engine tests" INFO "rehearsal: skipped plan_counts_steps_like_the_spec (select_device(\"auto\") needs a GPU in a CUDA build)"
    fi
    for t in "${tests[@]}"; do
      # From the engine's directory, as cargo test runs them (tests may read files by relative path).
      (cd "$repo/engine" && timeout "${LORAD_GPU_TEST_TIMEOUT:-240}" "$t" --test-threads "$(nproc)" ${skip[@]+"${skip[@]}"}) >> "$out/engine-tests.log" 2>&1 || ok=0
    done
    summary="$(grep -E '^test result:' "$out/engine-tests.log" | awk '{p+=$4; f+=$6; i+=$8} END {printf "%d passed, %d failed, %d ignored", p, f, i}')"
    if [ "$ok" = 1 ]; then
      record "engine tests" PASS "$summary in $(( $(date +%s) - t0 )) s (CUDA build; only plan_counts_steps_like_the_spec opens cuda:0)"
    else
      record "engine tests" FAIL "$summary; $(grep -m3 -E '^test .* FAILED$|panicked|Terminated' "$out/engine-tests.log" | tr '\n' ' ') (log: $out/engine-tests.log)"
    fi
  fi
fi

# ---------------------------------------------------------------- 4. CUDA smoke: generate cpu vs GPU
note "smoke: lorad generate on the tiny model, cpu vs $device"
"$lorad" make-tiny-model "$work/tiny" --seed 0 > /dev/null 2> "$work/tiny.err" || fatal "smoke" "make-tiny-model failed: $(tail -2 "$work/tiny.err")"
gen() { timeout 120 "$lorad" generate --model "$work/tiny" --raw --prompt "the quick brown fox" --max-new 24 --device "$1" 2> "$work/generate-$1.err"; }
if cpu_text="$(gen cpu)" && gpu_text="$(gen "$device")"; then
  printf '%s\n' "== cpu" "$cpu_text" "== $device" "$gpu_text" > "$out/generate.txt"
  ids() { grep -m1 '^--- completion ids' <<< "$1" || echo "(no completion ids line)"; }
  top() { grep -m1 -o '^--- top5 last-position logits \[([0-9]*, [-0-9.e]*)' <<< "$1" | sed 's/.*\[(//; s/)$//'; }
  if [ "$(ids "$cpu_text")" = "$(ids "$gpu_text")" ]; then
    record "generate tiny cpu vs $device" PASS "same 24 greedy tokens; last top logit (id, value): cpu ($(top "$cpu_text")), $device ($(top "$gpu_text"))"
  else
    record "generate tiny cpu vs $device" FAIL "greedy tokens differ: cpu $(ids "$cpu_text") vs $device $(ids "$gpu_text") (both in $out/generate.txt)"
  fi
else
  record "generate tiny cpu vs $device" FAIL "lorad generate failed: $(tail -3 "$work/generate-cpu.err" "$work/generate-$device.err" 2> /dev/null | tr '\n' ' ')"
fi

# ---------------------------------------------------------------- model and data
"$PY" -c 'import torch, transformers, peft, safetensors' 2> "$work/py.err" ||
  fatal "python" "$PY lacks torch/transformers/peft/safetensors: $(tail -1 "$work/py.err") (set PYTHON=)"
if [ "$rehearsal" = 0 ]; then
  "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' ||
    record "python" FAIL "$PY's torch $("$PY" -c 'import torch; print(torch.__version__)') sees no CUDA GPU: the PyTorch row will fail"
fi
if [ -z "$model" ]; then
  gguf="$(find "$repo/bench/out/smollm2" -name '*.gguf' -print -quit 2> /dev/null || true)"
  if [ "$rehearsal" = 0 ] && [ -n "$gguf" ] && "$PY" -c 'import gguf' 2> /dev/null; then
    model="$gguf"
    what="SmolLM2-135M-Instruct ($(basename "$gguf"), dequantized to f32)"
  else
    layers=30
    [ "$rehearsal" = 1 ] && layers=2
    model="$work/smollm2-shape"
    note "making a random-weight model of SmolLM2-135M's shape ($layers layers) in $model"
    "$PY" - "$repo/bench/speed" "$model" "$layers" <<'PY' || fatal "model" "could not write the random SmolLM2-shaped model"
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import make_llama110m as m  # the speed benchmark's random-Llama writer (config, tokenizer, weights)
from safetensors.torch import save_file
out, layers = Path(sys.argv[2]), int(sys.argv[3])
# SmolLM2-135M: hidden 576, 30 layers, 9 heads of 64, 3 KV heads, MLP 1536, vocab 49152, tied head.
s = dict(hidden=576, layers=layers, heads=9, kv_heads=3, intermediate=1536, vocab=49152, max_pos=8192)
cfg = m.config(s) | {"tie_word_embeddings": True, "rope_theta": 100000.0,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
                     "seed_of_random_weights": 0}
w = m.weights(s, 0)
del w["lm_head.weight"]
out.mkdir(parents=True, exist_ok=True)
save_file(w, str(out / "model.safetensors"), metadata={"format": "pt"})
(out / "tokenizer.json").write_text(json.dumps(m.tokenizer(s["vocab"])) + "\n")
(out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
(out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
PY
    what="random-weight model of SmolLM2-135M's shape ($layers layers, 576 hidden, vocab 49152, tied), HF layout"
  fi
else
  what="$model"
fi
case "$model" in
  *.gguf) vocab_words=0 ;;
  *) vocab_words="$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1] + "/config.json"))["vocab_size"])' "$model")" ;;
esac
# The daemon's dataset: {"text"} lines longer than --seq tokens, one fresh line per example. With the
# random model's word-level tokenizer (t3 .. tN, one token each) the words are tokens; with the GGUF,
# English words (several per token).
"$PY" - "$work/data.jsonl" "$(( batch * (steps + warmup) + batch ))" "$seq" "$vocab_words" <<'PY'
import json, random, sys
path, lines, seq, vocab = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(0)
words = "the model learns from every example it reads while the daemon keeps each job safe".split()
with open(path, "w") as f:
    for _ in range(lines):
        if vocab:
            text = " ".join(f"t{rng.randrange(3, vocab)}" for _ in range(seq + 16))
        else:
            text = " ".join(rng.choice(words) for _ in range(seq + 16))
        f.write(json.dumps({"text": text}) + "\n")
PY

# ---------------------------------------------------------------- 5. lorad through the daemon
note "lorad daemon: LoRA training on $device ($what, batch $batch x $seq, $warmup + $steps steps)"
export LORAD_SOCKET="$work/lorad.sock"
"$lorad" --user --socket "$LORAD_SOCKET" --state-dir "$work/state" 2> "$out/daemon.log" &
daemon_pid=$!
for _ in $(seq 100); do "$loractl" status > /dev/null 2>&1 && break; sleep 0.2; done
"$loractl" --json status > "$out/status-before.json" 2> "$work/status.err" ||
  fatal "daemon" "lorad does not answer on $LORAD_SOCKET: $(tail -3 "$out/daemon.log")"
gpus="$("$PY" -c 'import json, sys; d = json.load(open(sys.argv[1])); print("; ".join(x["name"] + ": " + x["description"] for x in d["devices"]))' "$out/status-before.json")"
if [ "$rehearsal" = 1 ]; then
  record "daemon devices" INFO "$gpus"
elif grep -q 'cuda:0' <<< "$gpus"; then
  record "daemon devices (NVML)" PASS "$gpus"
else
  record "daemon devices (NVML)" FAIL "loractl status lists no cuda:0: $gpus"
fi
t0=$(date +%s)
if id=$("$loractl" submit --template basic-fine-tune --model "$model" --data "$work/data.jsonl" \
     --set device="$device" --set dtype=f32 --set lora_r=16 --set lora_alpha=32 --set lora_dropout=0 \
     --set target_modules=q_proj,k_proj,v_proj,o_proj --set batch_size="$batch" --set max_seq_len="$seq" \
     --set max_steps=$((steps + warmup)) --set warmup_steps=0 --set schedule=constant --set lr=2e-4 2> "$work/submit.err"); then
  # While it runs: the device it was placed on, as status shows it.
  for _ in $(seq 120); do
    state="$("$loractl" --json show "$id" 2> /dev/null | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["state"])' 2> /dev/null || true)"
    case "$state" in running|completed|failed|cancelled) break ;; esac
    sleep 0.5
  done
  "$loractl" --json status > "$out/status-running.json" 2> /dev/null || true
  if "$loractl" wait "$id" --timeout "${LORAD_GPU_TRAIN_TIMEOUT:-240}" > /dev/null; then
    record "lorad training on $device" PASS "job $id: $((steps + warmup)) steps in $(( $(date +%s) - t0 )) s (submit to end)"
  else
    rc=$?
    why="$("$loractl" --json show "$id" 2> /dev/null | "$PY" -c 'import json, sys; j = json.load(sys.stdin); print(j["state"], j.get("reason") or "")' 2> /dev/null || true)"
    [ "$rc" = 3 ] && why="timed out after ${LORAD_GPU_TRAIN_TIMEOUT:-240} s; $why"
    "$loractl" logs "$id" > "$out/job.log" 2>&1 || true
    tail -25 "$out/job.log" >&2
    record "lorad training on $device" FAIL "job $id: $why (log: $out/job.log)"
  fi
  "$loractl" --json metrics "$id" > "$out/lorad-metrics.json" 2> /dev/null || echo '[]' > "$out/lorad-metrics.json"
  "$loractl" --json show "$id" > "$out/lorad-job.json" 2> /dev/null || echo '{}' > "$out/lorad-job.json"
  "$loractl" logs "$id" > "$out/job.log" 2>&1 || true
else
  record "lorad training on $device" FAIL "submit refused: $(tail -3 "$work/submit.err")"
  echo '[]' > "$out/lorad-metrics.json"; echo '{}' > "$out/lorad-job.json"
fi
# 5b. Frozen weights kept in bf16 (issue 17) off the CPU: the same model in bf16, trained with the base
# kept (base_weights=stored: widened per product by candle's cast on the GPU) and widened at load (f32).
# The two jobs see the same f32 values, so their losses must agree.
if [ -d "$model" ]; then
  bf16="$work/model-bf16"
  if "$PY" - "$model" "$bf16" <<'PY'
import shutil, sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors"))
for f in src.glob("*.safetensors"):
    w = {k: v.to(torch.bfloat16) for k, v in load_file(str(f)).items()}
    save_file(w, str(dst / f.name), metadata={"format": "pt"})
PY
  then
    for bw in f32 stored; do
      jid=$("$loractl" submit --template basic-fine-tune --model "$bf16" --data "$work/data.jsonl" \
        --set device="$device" --set base_weights=$bw --set lora_r=16 --set lora_alpha=32 --set lora_dropout=0 \
        --set target_modules=q_proj,k_proj,v_proj,o_proj --set batch_size="$batch" --set max_seq_len="$seq" \
        --set max_steps=5 --set warmup_steps=0 --set schedule=constant --set lr=2e-4 2> "$work/submit-$bw.err") &&
        "$loractl" wait "$jid" --timeout "${LORAD_GPU_TRAIN_TIMEOUT:-240}" > /dev/null &&
        "$loractl" --json metrics "$jid" > "$out/bf16-$bw-metrics.json" 2> /dev/null ||
        echo '[]' > "$out/bf16-$bw-metrics.json"
    done
    verdict="$("$PY" - "$out/bf16-f32-metrics.json" "$out/bf16-stored-metrics.json" <<'PY'
import json, sys
a, b = ([p["loss"] for p in json.load(open(f))] for f in sys.argv[1:3])
if len(a) != 5 or len(b) != 5:
    print(f"FAIL steps: {len(a)} widened at load, {len(b)} kept")
else:
    worst = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))
    print(("PASS" if worst <= 1e-4 else "FAIL") + f" 5 steps each; losses kept vs widened differ by {worst:.2e} relative at most")
PY
)"
    record "kept-bf16 base on $device" "${verdict%% *}" "${verdict#* }"
  else
    record "kept-bf16 base on $device" FAIL "could not write the bf16 copy of $model"
  fi
fi

kill "$daemon_pid" 2> /dev/null || true; wait "$daemon_pid" 2> /dev/null || true; daemon_pid=""

# ---------------------------------------------------------------- 6. PyTorch + PEFT on the same GPU
torch_device=cuda
[ "$rehearsal" = 1 ] && torch_device=cpu
note "PyTorch + PEFT on $torch_device (same model, batch, steps)"
if "$PY" "$repo/bench/speed/make_ids.py" "$model" "$work/ids.json" --batch "$batch" --seq "$seq" --seed 0 2> "$work/ids.err" &&
   timeout 300 "$PY" "$repo/bench/speed/torch_speed.py" --model "$model" --ids "$work/ids.json" --steps "$steps" \
     --warmup "$warmup" --reps 3 --threads "$(nproc)" --device "$torch_device" --json "$out/torch.json" 2> "$out/torch.log"; then
  record "PyTorch + PEFT on $torch_device" PASS "$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["version"])' "$out/torch.json")"
else
  tail -5 "$out/torch.log" >&2 2> /dev/null || true
  record "PyTorch + PEFT on $torch_device" FAIL "bench/speed/torch_speed.py failed: $(tail -2 "$work/ids.err" "$out/torch.log" 2> /dev/null | tr '\n' ' ')"
fi

# ---------------------------------------------------------------- 7. the numbers
"$PY" - "$out" "$warmup" "$device" "$torch_device" "$what, batch $batch x seq $seq, LoRA r16 q,k,v,o, f32, $steps timed steps after $warmup" <<'PY' || record "speed table" FAIL "could not read the engines' results"
import json, statistics, sys
from pathlib import Path
out, warmup, device, torch_device, what = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
rows = []
points = json.loads((out / "lorad-metrics.json").read_text() or "[]")
timed = [p for p in points if p.get("step", 0) > warmup]
if timed:
    gpu = [p["gpu"] for p in timed if p.get("gpu")]
    step_ms = statistics.median(p["step_ms"] for p in timed)
    tokens = statistics.median(p["tokens_per_s"] * p["step_ms"] / 1000 for p in timed)
    rows.append({"engine": "lorad (daemon)", "device": device, "tokens_per_s": tokens / (step_ms / 1000), "step_ms": step_ms,
                 "gpu_mem_mb": max((g["mem_used_mb"] for g in gpu), default=None), "gpu_mem_how": "(NVML, device total)",
                 "gpu_util_pct": statistics.mean(g["util_pct"] for g in gpu) if gpu else None,
                 "gpu_power_w": statistics.mean(g["power_w"] for g in gpu) if gpu else None,
                 "nvml_points": f"{len(gpu)} of {len(timed)}"})
    job = json.loads((out / "lorad-job.json").read_text() or "{}")
    prog = job.get("progress") or {}
    rows[-1]["energy"] = f"{prog.get('energy_j')} J ({prog.get('energy_source')})"
    rows[-1]["placed_on"] = prog.get("device")
tj = out / "torch.json"
if tj.exists():
    t = json.loads(tj.read_text())
    rows.append({"engine": t["version"].split(" (")[0], "device": t.get("device", torch_device), "tokens_per_s": t["tokens_per_s"],
                 "step_ms": t["phases_ms"]["step"], "gpu_mem_mb": t.get("peak_gpu_mb"), "gpu_mem_how": "(torch max allocated)"})
ratio = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"] if len(rows) == 2 and rows[0]["engine"].startswith("lorad") else None
(out / "speed.json").write_text(json.dumps({"what": what, "rows": rows, "ratio": ratio}, indent=2) + "\n")
for r in rows:
    if r["engine"].startswith("lorad"):
        print(f"lorad placed on {r.get('placed_on')}; NVML samples in {r['nvml_points']} points; energy {r.get('energy')}", file=sys.stderr)
PY
if [ "$rehearsal" = 0 ] && [ -s "$out/speed.json" ]; then
  if "$PY" -c 'import json, sys; r = json.load(open(sys.argv[1]))["rows"]; sys.exit(0 if r and r[0]["engine"].startswith("lorad") and r[0]["gpu_util_pct"] is not None else 1)' "$out/speed.json"; then
    record "NVML telemetry in metrics" PASS "every timed point's gpu field read (util, memory, power)"
  else
    record "NVML telemetry in metrics" FAIL "lorad's metric points carry no gpu field (NVML sampling)"
  fi
fi
finish
