#!/usr/bin/env python3
"""Writes the memory benchmark's large model: a random Llama of TinyLlama-1.1B's shape in HF layout
(config.json, model.safetensors, the word-level tokenizer.json of bench/speed/make_llama110m.py).

    python make_llama1b.py OUT_DIR [--seed 0] [--dtype f32|bf16]

Shape: hidden 2048, 22 layers, 32 heads and 4 KV heads (head_dim 64), intermediate 5632, vocab 32000,
untied LM head: 1,100,048,384 parameters, 4.4 GB in f32 (2.2 GB in bf16). Weights normal(0, 0.02) from
a seeded torch generator, norms 1, as make_llama110m.py. The file is written one tensor at a time (the
safetensors header first), so this needs memory for one tensor, not for the model. The same seed and
dtype give the same file; an existing model with the same config is left as it is.
"""
import argparse
import json
import struct
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "speed"))
import make_llama110m as base  # noqa: E402  (config and tokenizer shared with the speed benchmark)

SHAPE = dict(hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632, vocab=32000, max_pos=2048)
DTYPES = {"f32": (torch.float32, "F32", "float32"), "bf16": (torch.bfloat16, "BF16", "bfloat16")}


def shapes(s):
    """(name, shape, is_norm) in the order the file stores them."""
    h, i, v, d = s["hidden"], s["intermediate"], s["vocab"], s["hidden"] // s["heads"]
    out = [("model.embed_tokens.weight", (v, h), False)]
    for n in range(s["layers"]):
        p = f"model.layers.{n}"
        out += [
            (f"{p}.self_attn.q_proj.weight", (s["heads"] * d, h), False),
            (f"{p}.self_attn.k_proj.weight", (s["kv_heads"] * d, h), False),
            (f"{p}.self_attn.v_proj.weight", (s["kv_heads"] * d, h), False),
            (f"{p}.self_attn.o_proj.weight", (h, s["heads"] * d), False),
            (f"{p}.mlp.gate_proj.weight", (i, h), False),
            (f"{p}.mlp.up_proj.weight", (i, h), False),
            (f"{p}.mlp.down_proj.weight", (h, i), False),
            (f"{p}.input_layernorm.weight", (h,), True),
            (f"{p}.post_attention_layernorm.weight", (h,), True),
        ]
    out += [("model.norm.weight", (h,), True), ("lm_head.weight", (v, h), False)]
    return out


def write_safetensors(path, s, seed, dtype):
    torch_dtype, st_dtype, _ = DTYPES[dtype]
    width = torch.tensor([], dtype=torch_dtype).element_size()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    tensors = shapes(s)
    for name, shape, _ in tensors:
        size = width
        for dim in shape:
            size *= dim
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    g = torch.Generator().manual_seed(seed)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name, shape, is_norm in tensors:
            t = torch.ones(shape) if is_norm else torch.randn(*shape, generator=g) * 0.02
            t = t.to(torch_dtype).contiguous()
            raw = t.view(torch.int16) if torch_dtype == torch.bfloat16 else t
            f.write(raw.numpy().tobytes())
    tmp.rename(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="f32")
    args = ap.parse_args()
    name = DTYPES[args.dtype][2]
    cfg = base.config(SHAPE) | {"torch_dtype": name, "dtype": name, "seed_of_random_weights": args.seed}
    cfg_path, st_path = args.out / "config.json", args.out / "model.safetensors"
    if st_path.is_file() and cfg_path.is_file() and json.loads(cfg_path.read_text()) == cfg:
        print(args.out)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    write_safetensors(st_path, SHAPE, args.seed, args.dtype)
    (args.out / "tokenizer.json").write_text(json.dumps(base.tokenizer(SHAPE["vocab"])) + "\n")
    (args.out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")  # last: its presence marks a complete model
    print(args.out)


if __name__ == "__main__":
    main()
