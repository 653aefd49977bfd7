#!/usr/bin/env python3
"""Check a lorad adapter against HF transformers + PEFT.

Loads the base model with AutoModelForCausalLM + AutoTokenizer, the adapter with
PeftModel.from_pretrained, and prints the mean next-token loss on the training data without and with
the adapter. The data is tokenized the way lorad does it: BOS (when the model has one) + text + EOS,
truncated to --max-seq-len, loss averaged over all predicted tokens.

    python3 bench/peft_check.py MODEL_DIR ADAPTER_DIR DATA.jsonl [--max-seq-len 64] [--expect lorad_losses.json]

On first use it creates bench/.venv and pip-installs torch, transformers, peft and safetensors (CPU is
enough), then re-runs itself inside it. With --expect (the file written by the `peft_fixture` test) it
also compares with lorad's own figures and exits non-zero when they differ by more than 1e-4 relative.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

VENV = Path(__file__).resolve().parent / ".venv"
PACKAGES = ["torch", "transformers", "peft", "safetensors"]


def ensure_venv():
    """Re-executes this script with bench/.venv's python, creating the venv first if needed."""
    if Path(sys.prefix).resolve() == VENV.resolve():
        return
    python = VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {VENV} and installing {', '.join(PACKAGES)} (torch is large)", file=sys.stderr)
        subprocess.check_call([sys.executable, "-m", "venv", str(VENV)])
        subprocess.check_call([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"])
        subprocess.check_call([str(python), "-m", "pip", "install", "-q", *PACKAGES])
    os.execv(str(python), [str(python), *sys.argv])


def read_texts(path):
    texts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            obj = json.loads(line)
            if not isinstance(obj.get("text"), str):
                sys.exit(f"{path} line {n}: missing string field \"text\"")
            texts.append(obj["text"])
    return texts


def mean_loss(model, examples):
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for ids in examples:
            if len(ids) < 2:
                continue
            x = torch.tensor([ids])
            logits = model(input_ids=x).logits[0, :-1].float()
            total += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            count += len(ids) - 1
    return total / max(count, 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("adapter_dir")
    ap.add_argument("dataset")
    ap.add_argument("--max-seq-len", type=int, default=64)
    ap.add_argument("--expect", help="lorad_losses.json from the peft_fixture test")
    args = ap.parse_args()
    ensure_venv()

    import torch
    import transformers
    import peft
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir)  # float32: the dtype in config.json
    model.eval()
    bos, eos = model.config.bos_token_id, model.config.eos_token_id
    examples = []
    for text in read_texts(args.dataset):
        ids = ([bos] if bos is not None else []) + tok(text, add_special_tokens=False)["input_ids"]
        ids = (ids + ([eos] if eos is not None else []))[: args.max_seq_len]
        examples.append(ids)

    base = mean_loss(model, examples)
    peft_model = PeftModel.from_pretrained(model, args.adapter_dir)
    peft_model.eval()
    lora_b = [(n, p) for n, p in peft_model.named_parameters() if "lora_B" in n]
    loaded = sum(1 for _, p in lora_b if p.abs().max().item() > 0)
    adapted = mean_loss(peft_model, examples)

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
    print(f"examples: {len(examples)}, lora modules: {len(lora_b)} ({loaded} with non-zero lora_B)")
    print(f"mean loss without adapter: {base:.6f}")
    print(f"mean loss with adapter:    {adapted:.6f}")
    if args.expect:
        want = json.load(open(args.expect))
        ok = True
        for name, got in [("base_loss", base), ("adapter_loss", adapted)]:
            rel = abs(got - want[name]) / abs(want[name])
            ok &= rel < 1e-4
            print(f"lorad {name}: {want[name]:.6f} (relative difference {rel:.2e})")
        if not ok or loaded != len(lora_b):
            sys.exit("MISMATCH between lorad and transformers + PEFT")
        print("OK: lorad and transformers + PEFT agree")


if __name__ == "__main__":
    main()
