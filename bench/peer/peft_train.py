#!/usr/bin/env python3
"""PyTorch + PEFT side of the peer benchmark: LoRA training steps on a GGUF model, timed.

    python peft_train.py --gguf FILE --data DATA.jsonl [--steps 8] [--warmup 2] [--batch 4] [--seq 256]
                         [--r 16] [--targets q_proj,k_proj,v_proj,o_proj] [--threads 2]

Loads the GGUF with transformers' GGUF loader (dequantized to f32), wraps it with PEFT LoRA, and runs
AdamW steps on batches of `batch` sequences of exactly `seq` tokens (BOS + text, truncated), the same
data lorad sees. Prints one JSON line: tokens/s over the timed steps, s/step, peak RSS (MiB), losses.
"""
import argparse
import json
import resource
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attn", default="sdpa")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gguf = Path(args.gguf)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32, attn_implementation=args.attn
    )
    cfg = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0,
                     target_modules=args.targets.split(","), task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    model.train()

    rows = []
    for line in Path(args.data).read_text().splitlines():
        if line.strip():
            ids = tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
            if tok.bos_token_id is not None:
                ids = [tok.bos_token_id] + ids
            if len(ids) >= args.seq:
                rows.append(ids[: args.seq])
    assert len(rows) >= args.batch, "dataset lines are too short for --seq"

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        batch = [rows[(step * args.batch + i) % len(rows)] for i in range(args.batch)]
        ids = torch.tensor(batch)
        t = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t
        losses.append(out.loss.item())
        if step >= args.warmup:
            times.append(dt)
    step_s = sum(times) / len(times)
    print(json.dumps({
        "engine": "pytorch+peft",
        "torch": torch.__version__,
        "tokens_per_s": args.batch * args.seq / step_s,
        "step_s": step_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "losses": losses,
    }))


if __name__ == "__main__":
    main()
