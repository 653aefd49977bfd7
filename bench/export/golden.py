"""Regenerates plugins/export-merged/tests/golden/reference.json with real PEFT and transformers.

DIR is what `export_check golden-setup DIR` wrote from tests/golden/recipe.json: the tiny model
(model/), and per adapter <name>/adapter (seeded, written by lorad's adapter writer) and <name>/merged
(written by the merged exporter). For each adapter this records the logits of
`PeftModel.from_pretrained(base, adapter)` and of `AutoModelForCausalLM.from_pretrained(merged)` on the
recipe's tokens (every vocab_stride-th column), and prints how lorad's own logits
(DIR/lorad_golden.json) compare.

    bench/.venv/bin/python bench/export/golden.py DIR RECIPE.json REFERENCE.json
"""

import json
import sys

import peft
import torch
import transformers
from peft import PeftModel
from transformers import AutoModelForCausalLM


def rows(logits: torch.Tensor, stride: int):
    # 9 significant digits represent every float32 exactly.
    return [[float(f"{v:.9g}") for v in row[::stride].tolist()] for row in logits]


def rel(a, b) -> float:
    a, b = torch.tensor(a), torch.tensor(b)
    return ((a - b).abs().max() / b.abs().max()).item()


def main() -> None:
    work, recipe_path, out_path = sys.argv[1:4]
    torch.set_num_threads(2)
    recipe = json.load(open(recipe_path))
    recipe.pop("about", None)
    lorad = json.load(open(f"{work}/lorad_golden.json"))
    ids = torch.tensor([recipe["tokens"]])
    stride = recipe["vocab_stride"]
    reference = {"recipe": recipe, "peft": {}, "merged": {}}
    for name in recipe["adapters"]:
        base = AutoModelForCausalLM.from_pretrained(f"{work}/model", dtype=torch.float32)
        model = PeftModel.from_pretrained(base, f"{work}/{name}/adapter")
        model.eval()
        merged = AutoModelForCausalLM.from_pretrained(f"{work}/{name}/merged")
        merged.eval()
        with torch.no_grad():
            reference["peft"][name] = rows(model(ids).logits[0], stride)
            reference["merged"][name] = rows(merged(ids).logits[0], stride)
        vocab = model.config.vocab_size
        print(
            f"{name}: lorad LoRA vs PEFT {rel(lorad[name]['lora'], reference['peft'][name]):.2e}, "
            f"lorad on merged vs transformers on merged "
            f"{rel(lorad[name]['merged'], reference['merged'][name]):.2e}, "
            f"transformers merged vs PEFT {rel(reference['merged'][name], reference['peft'][name]):.2e}",
            file=sys.stderr,
        )
    reference["vocab_ids"] = list(range(0, vocab, stride))
    reference["generated_by"] = (
        f"bench/export_check.sh --update-golden: torch {torch.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}"
    )
    with open(out_path, "w") as f:
        json.dump(reference, f, separators=(",", ":"))
        f.write("\n")
    print(out_path)


if __name__ == "__main__":
    main()
