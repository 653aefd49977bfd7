#!/usr/bin/env python3
"""PyTorch + PEFT side of the speed benchmark (`bench/speed.sh`): LoRA training steps timed per phase
(forward loss, backward, optimizer), then the forward and backward of each op class timed in isolation
at the model's shapes, with the modules and functions transformers' Llama uses.

    python torch_speed.py --model PATH --ids IDS.json --json OUT.json [--steps 5] [--warmup 2]
                          [--reps 5] [--threads 2] [--device cpu]

PATH is an HF directory or a GGUF file (transformers' GGUF loader, dequantized to f32). LoRA r 16,
alpha 32, dropout 0 on q,k,v,o (PEFT), SDPA attention, f32, AdamW over the LoRA parameters with the
gradient norm clipped to 1 (lorad's defaults: lr 2e-4, betas 0.9/0.999, eps 1e-8, no weight decay).
The loss is transformers' own (labels = ids: every position but the last predicts the next token).
Writes JSON with the same keys as lorad's `daemon/examples/speed.rs`. `--device cuda` (or cuda:N) runs
on a GPU (bench/gpu/check.sh): every timer then waits for the GPU (torch.cuda.synchronize), and the JSON
adds `peak_gpu_mb` (torch.cuda.max_memory_allocated).
"""
import argparse
import sys
import json
import resource
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

CLASSES = ["matmul", "attention", "norms", "elementwise", "cross_entropy"]


DEVICE = torch.device("cpu")


def sync():
    """Waits for the GPU's queued work, so that a timer reads the work's end (a no-op on the CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def load(path: Path, attn: str):
    from transformers import AutoModelForCausalLM

    kw = dict(dtype=torch.float32, attn_implementation=attn)
    if path.is_dir():
        return AutoModelForCausalLM.from_pretrained(path, **kw)
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kw)


def run_steps(model, ids, warmup, steps, lr, clip):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    phases = {"fwd": [], "bwd": [], "opt": [], "step": []}
    losses = []
    for step in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        value = loss.item()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        del loss
        ms = {"fwd": t1 - t0, "bwd": t2 - t1, "opt": t3 - t2, "step": t3 - t0}
        ms = {k: v * 1000 for k, v in ms.items()}
        print(f"step {step + 1}: loss {value:.4f}, {ms['step']:.0f} ms (fwd {ms['fwd']:.0f}, "
              f"bwd {ms['bwd']:.0f}, opt {ms['opt']:.1f})", flush=True, file=sys.stderr)
        losses.append(value)
        if step >= warmup:
            for k, v in ms.items():
                phases[k].append(v)
    return phases, losses


def cases(model, ids):
    """(class, name, per_step, inputs, fn) for one step, on layer 0's modules (PEFT-wrapped where adapted)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    lm = model.get_base_model()  # LlamaForCausalLM with PEFT's LoRA layers inside
    cfg = lm.config
    layer = lm.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    b, t = ids.shape
    h, inter, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    heads, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, attn.head_dim

    def act(width):
        return torch.randn(b, t, width, device=DEVICE, requires_grad=True)

    out = []
    for module, width in [(attn.q_proj, h), (attn.k_proj, h), (attn.v_proj, h), (attn.o_proj, heads * d),
                          (mlp.gate_proj, h), (mlp.up_proj, h), (mlp.down_proj, inter)]:
        name = next(k for k, m in layer.named_modules() if m is module).split(".")[-1]
        out.append(("matmul", name, n, [act(width)], module))

    # LlamaAttention.forward between the q/k/v and o projections, with the interface the model uses.
    interface = ALL_ATTENTION_FUNCTIONS[cfg._attn_implementation]
    positions = torch.arange(t, device=DEVICE).unsqueeze(0).expand(b, t)
    with torch.no_grad():
        cos, sin = lm.model.rotary_emb(torch.zeros(1, dtype=torch.float32, device=DEVICE), positions)

    def attention(q, k, v):
        shape = (b, t, -1, d)
        q, k, v = (x.view(shape).transpose(1, 2) for x in (q, k, v))
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        # No mask: with SDPA and no padding the model passes none and SDPA runs causal.
        o, _ = interface(attn, q, k, v, None, dropout=0.0, scaling=attn.scaling)
        return o.reshape(b, t, -1).contiguous()

    out.append(("attention", "sdpa", n, [act(heads * d), act(kv * d), act(kv * d)], attention))
    out.append(("norms", "rms_norm", 2 * n + 1, [act(h)], layer.input_layernorm))
    out.append(("elementwise", "residual_add", 2 * n, [act(h), act(h)], lambda x, y: x + y))
    out.append(("elementwise", "silu_mul", n, [act(inter), act(inter)], lambda g, u: mlp.act_fn(g) * u))

    # LlamaForCausalLM: logits for every position, then ForCausalLMLoss's shifted sum.
    shift = F.pad(ids, (0, 1), value=-100)[..., 1:].reshape(-1)

    def cross_entropy(hidden):
        logits = lm.lm_head(hidden).float()
        return F.cross_entropy(logits.view(-1, cfg.vocab_size), shift, ignore_index=-100, reduction="sum")

    out.append(("cross_entropy", "lm_head_ce", 1, [act(h)], cross_entropy))
    return out


def time_case(model, inputs, fn, reps):
    """Median forward and backward ms: an untimed run, then at least `reps` timed ones, more (up to 50)
    until a quarter second is spent, as lorad's side does. Backward starts from a gradient of ones."""
    fwd, bwd = [], []
    started = time.perf_counter()
    for rep in range(51):
        if rep > reps and time.perf_counter() - started > 0.25:
            break
        sync()
        t0 = time.perf_counter()
        y = fn(*inputs)
        sync()
        t1 = time.perf_counter()
        y.backward(torch.ones_like(y))
        sync()
        t2 = time.perf_counter()
        del y
        for x in inputs:
            x.grad = None
        model.zero_grad(set_to_none=True)
        if rep > 0:
            fwd.append((t1 - t0) * 1000)
            bwd.append((t2 - t1) * 1000)
    return statistics.median(fwd), statistics.median(bwd)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--ids", type=Path, required=True)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    args = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: this PyTorch ({torch.__version__}) sees no CUDA GPU")

    import peft
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = load(args.model, args.attn).to(DEVICE)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=args.dropout,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.train()
    load_s = time.perf_counter() - t0
    ids = torch.tensor(json.loads(args.ids.read_text())["ids"], dtype=torch.long, device=DEVICE)
    b, t = ids.shape
    params = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    phases, losses = run_steps(model, ids, args.warmup, args.steps, lr=2e-4, clip=1.0)
    rss_train = peak_rss_mb()
    gpu_train = torch.cuda.max_memory_allocated(DEVICE) / 2**20 if DEVICE.type == "cuda" else None
    step_ms = statistics.median(phases["step"])

    ops, classes = [], {c: {"fwd": 0.0, "bwd": 0.0} for c in CLASSES}
    for cls, name, per_step, inputs, fn in cases(model, ids):
        f, bw = time_case(model, inputs, fn, args.reps)
        classes[cls]["fwd"] += f * per_step
        classes[cls]["bwd"] += bw * per_step
        ops.append({"class": cls, "name": name, "per_step": per_step, "fwd_ms": f, "bwd_ms": bw})
        print(f"op {cls:<13} {name:<15} x{per_step:<3} fwd {f:8.2f} ms  bwd {bw:8.2f} ms",
              file=sys.stderr)

    out = {
        "engine": "pytorch",
        "device": str(DEVICE),
        "version": f"PyTorch {torch.__version__} + PEFT {peft.__version__} (transformers {transformers.__version__})",
        "model": str(args.model),
        "params": params,
        "trainable_params": trainable,
        "batch": b,
        "seq": t,
        "threads": torch.get_num_threads(),
        "warmup": args.warmup,
        "steps": args.steps,
        "load_s": load_s,
        "phases_ms": {k: statistics.median(v) for k, v in phases.items()},
        "step_ms_all": phases["step"],
        "tokens_per_s": b * t / (step_ms / 1000),
        "peak_rss_mb": rss_train,
        "peak_rss_mb_after_ops": peak_rss_mb(),
        "peak_gpu_mb": gpu_train,
        "losses": losses,
        "op_reps": args.reps,
        "ops": ops,
        "op_classes_ms": classes,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
