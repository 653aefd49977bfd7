#!/usr/bin/env python3
"""PyTorch + PEFT side of the scale benchmark (bench/scale.sh): LoRA optimizer steps on an HF model, timed,
with the process's peak resident memory.

    python peft_step.py --model DIR --dtype bf16|f32 --batch B --seq S --json OUT.json
                        [--warmup 1] [--steps 1] [--checkpointing] [--threads 2]

The model is loaded with transformers (`dtype` bf16 keeps the file's bf16 weights; f32 widens them at
load), SDPA attention, then wrapped by PEFT: LoRA r 16, alpha 32, dropout 0 on q,k,v,o, as lorad's runs.
`--checkpointing` turns on transformers' gradient checkpointing (non-reentrant). Each step is forward
(transformers' own loss, labels = ids), backward, AdamW over the LoRA parameters (lr 2e-4, betas
0.9/0.999, eps 1e-8, no weight decay, gradient norm clipped to 1: lorad's defaults) on the same B x S random
token ids (seeded). `warmup` steps first, untimed; then `steps` timed ones, whose median is `s_per_step`,
and tokens/s = B x S / s_per_step. The peak is getrusage's ru_maxrss (the process's high-water mark over
loading and the steps, as lorad's peak.rs reports it), in decimal MB.

`--estimate-only` writes a rough predicted peak (`estimate_mb.total`) from config.json alone and stops:
what bench/scale.sh checks against the machine's memory before a run. See `estimate_mb`.
"""
import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6  # Linux: KiB


def estimate_mb(cfg, dtype, batch, seq, checkpointing):
    """A rough peak for PEFT on the CPU, in MB: torch and transformers (~0.6 GB), the weights at `dtype`
    (+5% for loading), and the saved activations (+20%): per layer and token ~10 hidden-wide and 5
    MLP-wide tensors at `dtype` (only the layer's input with checkpointing, plus one layer recomputed),
    and the logits (at `dtype`, their f32 copy, its softmax and gradient: dtype + 12 bytes per entry).
    Checked against measured runs of the 1B shape at 1 x 512 (5.3 GB bf16, 8.8 GB f32)."""
    w = {"bf16": 2, "f32": 4}[dtype]
    h, i, n, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // heads
    layer = h * (heads * d + 2 * kv * d) + heads * d * h + 3 * h * i + 2 * h
    params = v * h * (1 if cfg.get("tie_word_embeddings") else 2) + n * layer + h
    tokens = batch * seq
    per_layer = tokens * (10 * h + 5 * i) * w
    acts = (n * tokens * h * w + per_layer) if checkpointing else n * per_layer
    logits = tokens * v * (w + 12)
    return (0.6e9 + 1.05 * params * w + 1.2 * (acts + logits)) / 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--dtype", choices=["bf16", "f32"], required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--seq", type=int, required=True)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--estimate-only", action="store_true")
    args = ap.parse_args()
    if args.estimate_only:
        cfg = json.loads((args.model / "config.json").read_text())
        total = estimate_mb(cfg, args.dtype, args.batch, args.seq, args.checkpointing)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"estimate_mb": {"total": total}}) + "\n")
        return

    import torch

    torch.set_num_threads(args.threads)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[args.dtype]
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(model, lora)
    model.train()
    load_s = time.perf_counter() - t0
    load_peak = peak_rss_mb()
    print(f"loaded in {load_s:.1f} s, peak {load_peak:.0f} MB", file=sys.stderr, flush=True)

    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.item()
        del loss
        dt = time.perf_counter() - t0
        losses.append(value)
        if step >= args.warmup:
            times.append(dt)
        print(f"step {step + 1}: loss {value:.4f}, {dt:.1f} s, peak {peak_rss_mb():.0f} MB",
              file=sys.stderr, flush=True)

    s_per_step = statistics.median(times) if times else float("nan")
    out = {
        "model": str(args.model),
        "dtype": args.dtype,
        "checkpointing": args.checkpointing,
        "batch": args.batch,
        "seq": args.seq,
        "threads": torch.get_num_threads(),
        "warmup": args.warmup,
        "step_s": times,
        "s_per_step": s_per_step,
        "tokens_per_s": args.batch * args.seq / s_per_step,
        "losses": losses,
        "load_s": load_s,
        "load_peak_mb": load_peak,
        "peak_rss_mb": peak_rss_mb(),
        "torch": torch.__version__,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"{s_per_step:.2f} s/step, {out['tokens_per_s']:.1f} tokens/s, peak {out['peak_rss_mb']:.0f} MB",
          file=sys.stderr)


if __name__ == "__main__":
    main()
