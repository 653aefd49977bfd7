"""The Python half of bench/export_check.sh: real PEFT and transformers on lorad's exports.

WORK is the directory `export_check run` filled: job/ (lorad's training run), peft/ and merged/ (the
exporters' output), export.zip, lorad_logits.safetensors (lorad's logits of the base, of base + adapter
through lorad's LoRA forward, and of the merged export loaded through lorad) and lorad.json.

    bench/.venv/bin/python bench/export/compare.py WORK [LABEL]

Prints one JSON line: relative errors (max |a - b| / max |reference|) of
  peft_vs_lorad     PeftModel.from_pretrained(base, WORK/peft) vs lorad's LoRA forward
  merged_vs_lorad   AutoModelForCausalLM.from_pretrained(WORK/merged) vs lorad's LoRA forward
  merged_vs_peft    the same merged model vs PEFT
  lorad_merged      the merged export loaded by lorad vs lorad's LoRA forward
  weights_vs_peft   every merged tensor vs PEFT's own merge_and_unload(), relative to the tensor's scale
  base_vs_lorad     transformers' base model vs lorad's (same weights: a sanity check of the comparison)
  adapter_effect    how much the adapter changes lorad's logits (the errors must be far below it)
and whether AutoTokenizer.from_pretrained(WORK/merged) gives lorad's token ids.
"""

import json
import os
import sys
import zipfile

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def load_base(path: str):
    if path.endswith(".gguf"):
        folder, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
        return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def main() -> None:
    work = sys.argv[1]
    label = sys.argv[2] if len(sys.argv) > 2 else os.path.basename(work)
    torch.set_num_threads(2)
    info = json.load(open(os.path.join(work, "lorad.json")))
    lorad = load_file(os.path.join(work, "lorad_logits.safetensors"))
    ids = info["ids"]

    base = load_base(info["base"])
    base.eval()
    base_logits = logits(base, ids)
    peft = PeftModel.from_pretrained(base, os.path.join(work, "peft"))
    peft.eval()
    peft_logits = logits(peft, ids)

    merged_dir = os.path.join(work, "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    merged.eval()
    merged_logits = logits(merged, ids)
    tok = AutoTokenizer.from_pretrained(merged_dir)
    tok_ids = tok(info["text"], add_special_tokens=False)["input_ids"]

    # PEFT's own merge, tensor by tensor against the exported weights (peft is consumed here).
    reference = peft.merge_and_unload().state_dict()
    exported = merged.state_dict()
    weights = max(
        ((exported[k] - v).abs().max() / v.abs().max().clamp_min(1e-12)).item()
        for k, v in reference.items()
        if k in exported
    )
    missing = [k for k in reference if k not in exported]

    names = sorted(zipfile.ZipFile(os.path.join(work, "export.zip")).namelist())
    result = {
        "label": label,
        "dtype": str(merged.dtype).replace("torch.", ""),
        "tokens": len(ids),
        "steps": info["steps"],
        "loss_first_last": [info["losses"][0], info["losses"][-1]],
        "peft_vs_lorad": rel(peft_logits, lorad["lora"]),
        "merged_vs_lorad": rel(merged_logits, lorad["lora"]),
        "merged_vs_peft": rel(merged_logits, peft_logits),
        "lorad_merged": rel(lorad["merged"], lorad["lora"]),
        "weights_vs_peft": weights,
        "base_vs_lorad": rel(base_logits, lorad["base"]),
        "adapter_effect": rel(lorad["base"], lorad["lora"]),
        "tokenizer_ids_equal": tok_ids == info["text_ids"],
        "chat_template": tok.chat_template is not None,
        "missing_tensors": missing,
        "zip_entries": names,
        "export_s": info["export_s"],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
