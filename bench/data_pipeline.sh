#!/usr/bin/env bash
# Data pipeline benchmark: real LoRA steps on a ~24M-parameter random Llama (the tiny model's tokenizer,
# a bigger body) over a generated tokenization-heavy dataset (long texts cut to max_seq_len), once per
# `workers` value. Prints, per run, the mean step time and the mean time next_batch blocked
# (data_wait_ms), and writes them as JSON to $LORAD_BENCH_OUT (default bench/out/data_pipeline.json).
#
# Knobs (environment): LORAD_BENCH_WORKERS (default "0,<default workers>"), LORAD_BENCH_LINES (3000),
# LORAD_BENCH_BYTES per line (64000), LORAD_BENCH_STEPS (12), LORAD_BENCH_WARMUP steps left out of the
# means (2), LORAD_BENCH_BATCH (8), LORAD_BENCH_SEQ max_seq_len (256).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${LORAD_BENCH_OUT:-$PWD/bench/out/data_pipeline.json}
mkdir -p "$(dirname "$out")"
LORAD_BENCH_OUT=$out cargo test --release -p lorad --lib worker::data::bench::data_pipeline \
    -- --ignored --nocapture --test-threads 1
echo "results: $out"
