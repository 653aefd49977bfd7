#!/usr/bin/env python3
"""Writes the speed benchmark's mid-size model: a random Llama in HF layout that transformers and lorad
both load (config.json, model.safetensors, a minimal tokenizer.json, which lorad's HF loader requires
though the benchmark never tokenizes).

    python make_llama110m.py OUT_DIR [--seed 0]

Shape: hidden 768, 12 layers, 12 heads (head_dim 64), intermediate 3072, vocab 32000, untied LM head:
113M parameters in the decoder layers, 162M with the embedding and the head. Weights normal(0, 0.02)
from a seeded torch generator, norms 1. The same seed gives the same file; an existing model with the
same config is left as it is.
"""
import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPE = dict(hidden=768, layers=12, heads=12, kv_heads=12, intermediate=3072, vocab=32000, max_pos=2048)


def config(s):
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": s["hidden"],
        "intermediate_size": s["intermediate"],
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv_heads"],
        "head_dim": s["hidden"] // s["heads"],
        "hidden_act": "silu",
        "max_position_embeddings": s["max_pos"],
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-5,
        # Both spellings: transformers 4 reads rope_theta, 5 rope_parameters (and dtype).
        "rope_theta": 10000.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "dtype": "float32",
        "vocab_size": s["vocab"],
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def tokenizer(vocab):
    """A word-level tokenizer over placeholder tokens: valid for `tokenizers`, never used for speed."""
    specials = ["<unk>", "<s>", "</s>"]
    words = {t: i for i, t in enumerate(specials)}
    words.update({f"t{i}": i for i in range(len(specials), vocab)})
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, t in enumerate(specials)]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": None, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None,
            "decoder": None, "model": {"type": "WordLevel", "vocab": words, "unk_token": "<unk>"}}


def weights(s, seed):
    g = torch.Generator().manual_seed(seed)
    h, i, v, d = s["hidden"], s["intermediate"], s["vocab"], s["hidden"] // s["heads"]

    def normal(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).contiguous()

    out = {"model.embed_tokens.weight": normal(v, h)}
    for n in range(s["layers"]):
        p = f"model.layers.{n}"
        out[f"{p}.self_attn.q_proj.weight"] = normal(s["heads"] * d, h)
        out[f"{p}.self_attn.k_proj.weight"] = normal(s["kv_heads"] * d, h)
        out[f"{p}.self_attn.v_proj.weight"] = normal(s["kv_heads"] * d, h)
        out[f"{p}.self_attn.o_proj.weight"] = normal(h, s["heads"] * d)
        out[f"{p}.mlp.gate_proj.weight"] = normal(i, h)
        out[f"{p}.mlp.up_proj.weight"] = normal(i, h)
        out[f"{p}.mlp.down_proj.weight"] = normal(h, i)
        out[f"{p}.input_layernorm.weight"] = torch.ones(h)
        out[f"{p}.post_attention_layernorm.weight"] = torch.ones(h)
    out["model.norm.weight"] = torch.ones(h)
    out["lm_head.weight"] = normal(v, h)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cfg = config(SHAPE) | {"seed_of_random_weights": args.seed}
    cfg_path, st_path = args.out / "config.json", args.out / "model.safetensors"
    if st_path.is_file() and cfg_path.is_file() and json.loads(cfg_path.read_text()) == cfg:
        print(args.out)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    w = weights(SHAPE, args.seed)
    save_file(w, str(st_path), metadata={"format": "pt"})
    (args.out / "tokenizer.json").write_text(json.dumps(tokenizer(SHAPE["vocab"])) + "\n")
    (args.out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")  # last: its presence marks a complete model
    print(args.out)


if __name__ == "__main__":
    main()
