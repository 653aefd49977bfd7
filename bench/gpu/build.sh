#!/usr/bin/env bash
# Builds lorad with CUDA (`cargo build --release --features cuda -p lorad`) on any x86-64 Linux machine,
# with or without a GPU or an NVIDIA driver, so that the CUDA code cannot rot silently.
#
#   bench/gpu/build.sh [--system-cuda] [--all] [--tests] [--dist DIR] [-- EXTRA CARGO ARGS]
#
#   (default)      installs a pinned CUDA 13.0 toolkit from PyPI wheels into bench/.venv-cuda (nvcc,
#                  cicc, headers, cudart, nvrtc, cuBLAS, cuRAND: ~700 MB download, once) and builds.
#   --system-cuda  uses the machine's own toolkit instead (CUDA_ROOT, else the nvcc on PATH, else
#                  /usr/local/cuda); nothing is downloaded. For a GPU machine with CUDA installed.
#   --all          also builds loractl and the bundled plugins (`--workspace --features lorad/cuda`):
#                  what bench/gpu/check.sh runs.
#   --tests        also builds the engine's tests with CUDA (`cargo test --no-run -p lorad-engine
#                  --features cuda`).
#   --dist PATH    copies what was built (lorad; with --all loractl and the templates plugin; with
#                  --tests the engine's test binaries),
#                  stripped, into the directory PATH, or packs them into PATH if it ends in .tar.xz
#                  (each CUDA binary is ~70 MB stripped, ~10 MB packed), for a GPU machine that has no
#                  cargo: `check.sh --dist PATH` takes either (bench/gpu/README.md).
#
# Environment: CUDA_COMPUTE_CAP (default 90: H100/H200; candle compiles its kernels for exactly this
# target, since no GPU is there to ask), CARGO_TARGET_DIR (a separate one keeps the CPU build's
# artifacts apart: the cuda feature changes candle, so sharing one rebuilds it each time),
# LORAD_CUDA_VENV (default bench/.venv-cuda).
#
# What candle 0.11.1's `cuda` feature needs at build time (see bench/gpu/README.md):
#   - candle-kernels' build script (cudaforge) runs `nvcc` (NVCC, else PATH, else CUDA_HOME/bin) to
#     make PTX of its kernels and a static libmoe.a (sm_XX object code; g++ as the host compiler, the
#     CUDA runtime/CRT/CCCL headers), and links `cudart`.
#   - cudarc 0.19.10 with `cuda-version-from-build-system` + `dynamic-linking`: its build script reads
#     the version from `nvcc --version` (or CUDARC_CUDA_VERSION) and links `cuda`, `nvrtc`, `curand`,
#     `cublas`, `cublasLt` from CUDA_ROOT/CUDA_PATH/CUDA_HOME's lib, lib/stubs, lib64, ... So the
#     libraries must be there at link time, and libcuda.so (the driver) too: no wheel ships the
#     driver, so this script compiles a stub libcuda.so (soname libcuda.so.1, as the toolkit's
#     lib64/stubs one) from the list of driver functions cudarc declares. The binary then needs
#     the real libcuda.so.1 (an NVIDIA driver) and the CUDA 13 libraries above at run time.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

# The pinned toolkit: the CUDA 13.0 set of the `cuda-toolkit==13.0.2` meta-package (its extras nvcc,
# nvvm, crt, cudart, cccl, nvrtc, cublas, curand), with the wheels' sha256. CUDA 13.0 because PyPI has
# no CUDA 12 nvcc (nvidia-cuda-nvcc-cu12 ships ptxas but no nvcc), cudarc 0.19.10 knows 13.0 (not
# 13.5), and 13.0 needs the oldest driver of the CUDA 13 line (>= 580), which the lent H100/H200
# machines have (driver 580.159, nvcc 13.0).
CUDA_SERIES=13.0
CUDARC_VERSION_TAG=13000
REQUIREMENTS='nvidia-cuda-nvcc==13.0.88 --hash=sha256:56fe502eb77625a12f25172caa3cdddb4e4c8ba2c8c17dba44b164761b380f03
nvidia-nvvm==13.0.88 --hash=sha256:c5f41ffeb6466944a026dfa5317d7d85355c119bbec279205d22f1869d1054e0
nvidia-cuda-crt==13.0.88 --hash=sha256:2c8043c7c9e02492716426e9919fc78d2c5b3b2a7a768a88e952676b08aa55a4
nvidia-cuda-runtime==13.0.96 --hash=sha256:7f82250d7782aa23b6cfe765ecc7db554bd3c2870c43f3d1821f1d18aebf0548
nvidia-cuda-cccl==13.0.85 --hash=sha256:e0da7ad981f3a8aff08241b5bfc1af868742a63e2762f53a5171c492ef242649
nvidia-cuda-nvrtc==13.0.88 --hash=sha256:ad9b6d2ead2435f11cbb6868809d2adeeee302e9bb94bcf0539c7a40d80e8575
nvidia-cublas==13.1.0.3 --hash=sha256:ee8722c1f0145ab246bccb9e452153b5e0515fd094c3678df50b2a0888b8b171
nvidia-curand==10.4.0.35 --hash=sha256:1aee33a5da6e1db083fe2b90082def8915f30f3248d5896bcec36a579d941bfc'

die() { echo "bench/gpu/build.sh: error: $*" >&2; exit 1; }
note() { echo "== $*" >&2; }

system_cuda=0 all=0 tests=0 dist=""
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --system-cuda) system_cuda=1 ;;
    --all) all=1 ;;
    --tests) tests=1 ;;
    --dist) [ $# -ge 2 ] || die "--dist needs a directory or a .tar.xz path"; dist="$(realpath -m "$2")"; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

[ "$(uname -s)/$(uname -m)" = Linux/x86_64 ] || die "only x86-64 Linux is supported (the CUDA wheels are x86-64 manylinux); this is $(uname -s)/$(uname -m)"
command -v cargo > /dev/null || die "cargo not found: install Rust (rustup) first"
command -v g++ > /dev/null || die "g++ not found: nvcc needs a host C++ compiler (apt-get install g++)"
command -v gcc > /dev/null || die "gcc not found: needed to compile the stub libcuda.so (apt-get install gcc)"

export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
case "$CUDA_COMPUTE_CAP" in
  [0-9][0-9]|[0-9][0-9][0-9]|[0-9][0-9]a|[0-9][0-9][0-9][af]) ;;
  *) die "CUDA_COMPUTE_CAP='$CUDA_COMPUTE_CAP': expected a compute capability like 90 (H100), 80 (A100), 89 (L4)" ;;
esac

if [ "$system_cuda" = 1 ]; then
  # The machine's own toolkit.
  root="${CUDA_ROOT:-}"
  if [ -z "$root" ] && command -v nvcc > /dev/null; then root="$(cd "$(dirname "$(command -v nvcc)")/.." && pwd)"; fi
  [ -n "$root" ] || root=/usr/local/cuda
  [ -x "$root/bin/nvcc" ] || die "--system-cuda: no nvcc at $root/bin/nvcc (set CUDA_ROOT, or put nvcc on PATH, or drop --system-cuda to install CUDA from PyPI)"
  libdirs=("$root/lib64" "$root/lib" "$root/targets/x86_64-linux/lib")
  note "using the machine's CUDA at $root"
else
  # A pinned toolkit from PyPI wheels in a virtual environment.
  command -v python3 > /dev/null || die "python3 not found: needed to install the CUDA wheels from PyPI"
  venv="${LORAD_CUDA_VENV:-$repo/bench/.venv-cuda}"
  stamp="$venv/.lorad-cuda-requirements"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$REQUIREMENTS" ]; then
    note "installing CUDA $CUDA_SERIES from PyPI into $venv"
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv" || die "python3 -m venv $venv failed (Debian: apt-get install python3-venv)"
    req="$(mktemp)"
    printf '%s\n' "$REQUIREMENTS" > "$req"
    "$venv/bin/python" -m pip install --disable-pip-version-check -q --no-deps --only-binary=:all: \
      --require-hashes -r "$req" ||
      { rm -f "$req"; die "pip could not install the pinned CUDA wheels (is PyPI reachable?): $(tr '\n' ' ' <<< "$REQUIREMENTS" | sed 's/ --hash=[^ ]*//g')"; }
    rm -f "$req"
    printf '%s' "$REQUIREMENTS" > "$stamp"
  fi
  purelib="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  root="$purelib/nvidia/cu${CUDA_SERIES%%.*}"
  libdirs=("$root/lib")
fi

# Everything the build needs, checked up front so that a missing piece is named here rather than deep
# in a build script's panic.
missing=()
need() { [ -e "$1" ] || missing+=("$1 ($2)"); }
need "$root/bin/nvcc" "nvcc: nvidia-cuda-nvcc"
need "$root/nvvm/bin/cicc" "cicc, nvcc's device front end: nvidia-nvvm"
need "$root/include/cuda_runtime.h" "runtime headers: nvidia-cuda-runtime"
need "$root/include/crt/host_config.h" "CRT headers: nvidia-cuda-crt"
if [ -d "$root/include/cccl" ]; then need "$root/include/cccl/cuda/std/cstdint" "CCCL headers (libcu++): nvidia-cuda-cccl"
else need "$root/include/cuda/std/cstdint" "CCCL headers (libcu++): nvidia-cuda-cccl"; fi
findlib() {  # the first of libdirs holding $1 (a file name or glob)
  local d f
  for d in "${libdirs[@]}"; do for f in "$d"/$1; do [ -e "$f" ] && { echo "$f"; return 0; }; done; done
  return 1
}
declare -A sonames=([cudart]="libcudart.so.*[0-9]" [nvrtc]="libnvrtc.so.*[0-9]" [cublas]="libcublas.so.*[0-9]"
                    [cublasLt]="libcublasLt.so.*[0-9]" [curand]="libcurand.so.*[0-9]")
for lib in cudart nvrtc cublas cublasLt curand; do
  findlib "lib$lib.so" > /dev/null || findlib "${sonames[$lib]}" > /dev/null ||
    missing+=("lib$lib.so in ${libdirs[*]} (linked by candle/cudarc)")
done
if [ "${#missing[@]}" -gt 0 ]; then
  printf '  missing: %s\n' "${missing[@]}" >&2
  die "the CUDA toolkit at $root is incomplete (above); nothing was built"
fi

nvcc_version="$("$root/bin/nvcc" --version | sed -n 's/.*release \([0-9]*\.[0-9]*\),.*/\1/p')"
[ -n "$nvcc_version" ] || die "'$root/bin/nvcc --version' printed no 'release X.Y' line: $("$root/bin/nvcc" --version 2>&1 | tail -2)"
# cudarc 0.19.10 knows CUDA 11.4-12.9 and 13.0-13.4 (and panics on others: "Unsupported cuda toolkit
# version"); its bindings for a newer toolkit's nearest older version work through the stable ABI.
case "$nvcc_version" in
  11.[4-8]|12.[0-9]|13.[0-4]) cudarc_version="$(printf '%d0%d0' "${nvcc_version%%.*}" "${nvcc_version#*.}")" ;;
  13.*) cudarc_version=13040; note "nvcc $nvcc_version is newer than cudarc 0.19.10 knows: building its CUDA 13.4 bindings" ;;
  *) die "nvcc $nvcc_version: cudarc 0.19.10 supports CUDA 11.4 to 13.4" ;;
esac
[ "$system_cuda" = 1 ] || [ "$cudarc_version" = "$CUDARC_VERSION_TAG" ] ||
  die "the venv's nvcc is $nvcc_version, not the pinned $CUDA_SERIES: remove ${venv:-the venv} and rerun"

# Link names: the wheels (and some distributions) ship only the versioned sonames (libcublas.so.13);
# the linker's -lcublas wants libcublas.so. Put them, and the stub libcuda.so, in a directory of our own.
linkdir="${LORAD_CUDA_LINKDIR:-${venv:-$repo/target}/lorad-cuda-link}"
[ "$system_cuda" = 1 ] && linkdir="${CARGO_TARGET_DIR:-$repo/target}/lorad-cuda-link"
mkdir -p "$linkdir/lib/stubs"
for lib in cudart nvrtc cublas cublasLt curand; do
  f="$(findlib "lib$lib.so" || findlib "${sonames[$lib]}")"
  ln -sfn "$f" "$linkdir/lib/lib$lib.so"
done
if real="$(findlib libcuda.so || findlib 'stubs/libcuda.so')"; then
  ln -sfn "$real" "$linkdir/lib/stubs/libcuda.so"
else
  # A stub driver library for the linker only (never on the run-time path): every cu* function that
  # cudarc's driver bindings declare, each returning CUDA_ERROR_STUB_LIBRARY (34).
  cudarc_manifest="$(cd "$repo" && cargo metadata --format-version 1 --locked --features lorad/cuda 2> /dev/null |
    python3 -c 'import json, sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"))')" ||
    die "cargo metadata found no cudarc in the lock file (needs crates.io reachable, or cargo fetch done before)"
  sys_rs="$(dirname "$cudarc_manifest")/src/driver/sys/mod.rs"
  [ -f "$sys_rs" ] || die "cudarc's driver bindings not found at $sys_rs"
  stub_c="$linkdir/libcuda_stub.c"
  { echo "/* Generated by bench/gpu/build.sh from $sys_rs: link-time stub of the NVIDIA driver. */"
    grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+\(' "$sys_rs" | sed -E 's/^pub unsafe fn (cu[A-Za-z0-9_]+)\($/int \1(void) { return 34; }/' | sort -u
  } > "$stub_c.new"
  [ "$(grep -c '^int cu' "$stub_c.new")" -gt 100 ] || die "found too few driver functions in $sys_rs to make the stub libcuda.so"
  if ! cmp -s "$stub_c.new" "$stub_c" || [ ! -f "$linkdir/lib/stubs/libcuda.so" ]; then
    mv "$stub_c.new" "$stub_c"
    gcc -shared -fPIC -O0 -Wl,-soname,libcuda.so.1 -o "$linkdir/lib/stubs/libcuda.so" "$stub_c" ||
      die "compiling the stub libcuda.so failed"
  else
    rm -f "$stub_c.new"
  fi
fi

# cudarc searches lib, lib/stubs, lib64, ... under each of CUDA_HOME, CUDA_PATH, CUDA_ROOT (all that are
# set); cudaforge takes NVCC first and reads its headers from nvcc's ../include.
export CUDA_ROOT="$root" CUDA_PATH="$root" CUDA_HOME="$linkdir"
export NVCC="$root/bin/nvcc"
export PATH="$root/bin:$PATH"
export CUDARC_CUDA_VERSION="$cudarc_version"
# A venv toolkit's nvcc keeps its own binaries; its libnvvm etc. sit in lib/.
[ "$system_cuda" = 1 ] || export LD_LIBRARY_PATH="$root/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

note "nvcc $nvcc_version ($NVCC), cudarc bindings cuda-$cudarc_version, CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP, target dir ${CARGO_TARGET_DIR:-$repo/target}"
cd "$repo"
start=$(date +%s)
if [ "$all" = 1 ]; then
  cargo build --release --locked --workspace --features lorad/cuda ${extra[@]+"${extra[@]}"}
else
  cargo build --release --locked --features cuda -p lorad ${extra[@]+"${extra[@]}"}
fi
if [ "$tests" = 1 ]; then
  cargo test --release --locked --no-run --features cuda -p lorad-engine ${extra[@]+"${extra[@]}"}
fi
note "built in $(( $(date +%s) - start )) s"

out="${CARGO_TARGET_DIR:-$repo/target}/release"
if command -v readelf > /dev/null; then
  needed="$(readelf -d "$out/lorad" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | tr '\n' ' ')"
  note "$out/lorad needs: $needed"
  case "$needed" in *libcuda.so*) ;; *) die "$out/lorad does not link libcuda: was it built without CUDA?" ;; esac
fi

if [ -n "$dist" ]; then
  case "$dist" in *.tar.xz) pack="$dist"; dist="$(mktemp -d)/dist" ;; *) pack="" ;; esac
  if [ -e "$dist" ] && [ ! -f "$dist/BUILD-INFO" ] && [ -n "$(ls -A "$dist" 2> /dev/null)" ]; then
    die "--dist $dist exists and is not an earlier --dist output: name a new directory"
  fi
  rm -rf "$dist"
  mkdir -p "$dist"
  cp "$out/lorad" "$dist/"
  if [ "$all" = 1 ]; then
    cp "$out/loractl" "$dist/"
    # The templates plugin only (submit needs it); the exporters link the CUDA engine too (the
    # workspace's feature unification) and check.sh does not export.
    cp "$out/liblorad_templates.so" "$dist/"
  fi
  if [ "$tests" = 1 ]; then
    # The test executables that `cargo test --no-run` built (their names carry a hash).
    mkdir -p "$dist/tests"
    cargo test --release --locked --no-run --features cuda -p lorad-engine --message-format json 2> /dev/null |
      python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("profile", {}).get("test") and m.get("executable"):
        print(m["executable"])' |
      while read -r t; do cp "$t" "$dist/tests/"; done
    ls "$dist"/tests/* > /dev/null 2>&1 || die "found no engine test executables to copy"
  fi
  if command -v strip > /dev/null; then
    find "$dist" -type f \( -name lorad -o -name loractl -o -path '*/tests/*' \) -exec strip {} +
  fi
  printf 'nvcc %s, CUDA_COMPUTE_CAP=%s, built %s from %s\n' "$nvcc_version" "$CUDA_COMPUTE_CAP" "$(date -u +%FT%TZ)" \
    "$(git -C "$repo" rev-parse --short HEAD 2> /dev/null || echo '?')$(git -C "$repo" diff --quiet 2> /dev/null || echo '+changes')" > "$dist/BUILD-INFO"
  if [ -n "$pack" ]; then
    mkdir -p "$(dirname "$pack")"
    tar -C "$(dirname "$dist")" -cf - dist | xz -T0 -6 > "$pack.tmp" && mv "$pack.tmp" "$pack"
    rm -rf "$(dirname "$dist")"
    note "packed into $pack ($(du -h "$pack" | cut -f1))"
  else
    note "copied to $dist: $(cd "$dist" && find . -type f | sort | tr '\n' ' ')"
  fi
fi
