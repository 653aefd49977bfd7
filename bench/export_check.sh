#!/usr/bin/env bash
# Exporters against real PEFT and transformers (bench/.venv: torch, transformers, peft, gguf).
#
#   bench/export_check.sh                  (a) tiny model, (b) SmolLM2-135M-Instruct GGUF: table
#   bench/export_check.sh --update-golden  regenerate plugins/export-merged/tests/golden/reference.json
#                                          and run the golden test against it
#
# For each model lorad trains a short job (its real engine, on the demo dataset), the three exporter
# cdylibs (loaded with libloading, as lorad's worker loads them) write peft/, merged/ and export.zip, and
# lorad dumps its logits: the base, base + adapter through lorad's LoRA forward, and the merged export
# loaded back through lorad. bench/export/compare.py then loads the base in transformers (the GGUF through
# transformers' own GGUF loader), the adapter with PeftModel.from_pretrained, the merged directory with
# AutoModelForCausalLM/AutoTokenizer.from_pretrained, and prints relative errors (max |a-b| / max |ref|).
# By hand, not CI: (b) downloads ~93 MB once into bench/out/ (bench/fetch_smollm2.sh).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
py="$here/.venv/bin/python"
[ -x "$py" ] || { echo "bench/.venv is missing (see bench/peft_check.py, which creates it)" >&2; exit 1; }
out="$here/out/export"
mkdir -p "$out"

echo "== building lorad, the exporter plugins and the check program (release)" >&2
(cd "$repo" && cargo build --release -q -p lorad -p lorad-export-peft -p lorad-export-merged \
  -p lorad-export-zip && cargo build --release -q -p lorad-export-merged --example export_check)
check="$repo/target/release/examples/export_check"

if [ "${1:-}" = "--update-golden" ]; then
  golden="$repo/plugins/export-merged/tests/golden"
  work="$out/golden"
  rm -rf "$work"
  "$check" golden-setup "$work" >/dev/null
  "$py" "$here/export/golden.py" "$work" "$golden/recipe.json" "$golden/reference.json"
  (cd "$repo" && cargo test -q -p lorad-export-merged --test golden)
  exit 0
fi

rows=()
run_one() { # label base steps lr r
  local work="$out/$1"
  rm -rf "$work"
  echo "== $1: training $3 steps on $2, exporting, comparing" >&2
  "$check" run --base "$2" --work "$work" --steps "$3" --lr "$4" --r "$5" >/dev/null 2>"$work.log" \
    || { cat "$work.log" >&2; exit 1; }
  rows+=("$("$py" "$here/export/compare.py" "$work" "$1" 2>>"$work.log")")
}

"$repo/target/release/lorad" make-tiny-model "$out/tiny-model" --seed 3 >/dev/null 2>&1
run_one tiny "$out/tiny-model" 6 0.01 4
gguf="$("$here/fetch_smollm2.sh")"
run_one smollm2-q4_1-gguf "$gguf" 4 0.005 8

printf '%s\n' "${rows[@]}" > "$out/results.jsonl"
"$py" - "$out/results.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
cols = ["peft_vs_lorad", "merged_vs_lorad", "merged_vs_peft", "lorad_merged", "weights_vs_peft",
        "base_vs_lorad", "adapter_effect"]
print("| model | steps | loss first -> last | " + " | ".join(cols) + " | tokenizer ids | export s (peft / merged / zip) |")
print("|---" * (len(cols) + 5) + "|")
for r in rows:
    t = r["export_s"]
    print(f"| {r['label']} | {r['steps']} | {r['loss_first_last'][0]:.3f} -> {r['loss_first_last'][1]:.3f} | "
          + " | ".join(f"{r[c]:.1e}" for c in cols)
          + f" | {'equal' if r['tokenizer_ids_equal'] else 'DIFFER'} | {t['peft']:.2f} / {t['merged']:.2f} / {t['zip']:.2f} |")
bad = [r["label"] for r in rows
       if max(r[c] for c in cols[:5]) >= 1e-4 or not r["tokenizer_ids_equal"] or r["missing_tensors"]]
for r in rows:
    print(f"{r['label']}: zip entries {r['zip_entries']}; merged dtype {r['dtype']}; chat template {r['chat_template']}")
if bad:
    sys.exit(f"FAILED (relative error >= 1e-4, tokenizer or tensors differ): {bad}")
print("all relative errors < 1e-4")
PY
