#!/usr/bin/env python3
"""Writes the scale benchmark's models (bench/scale.sh): random weights with the real shapes of
Llama-3.2-1B, Llama-3.2-3B and Llama-3.1-8B, in the layouts people download.

    python make_model.py SHAPE FORMAT OUT [--seed 0]

SHAPE: llama3.2-1b, llama3.2-3b, llama3.1-8b, or `mini` (the same layout at hidden 512, 2 layers, to test
the writers quickly). FORMAT:
- `bf16`: an HF directory (config.json with torch_dtype/dtype bfloat16 and the model's llama3 RoPE
  scaling, one model.safetensors, the word-level tokenizer.json of bench/speed/make_llama110m.py over the
  full 128256-token vocabulary). Weights normal(0, 0.02) from a seeded torch generator, norms 1; written
  one tensor at a time, so this needs memory for one tensor, not for the model.
- `q4k`: one GGUF file (OUT is the file) as llama.cpp's converter lays it out: Q4_K for every 2-D weight
  (token_embd, output, blk.N.attn_q/k/v/output, ffn_gate/up/down), F32 norms, `llama.*` metadata and a
  byte-level BPE tokenizer (`gpt2` model, 128256 tokens: the 256 byte symbols, a few merges, then filler).
  The Q4_K blocks are random: per 256 values an f16 scale d (~1.3e-4) and dmin = 8 d, eight 6-bit
  sub-block scales in [16, 48) with mins chosen so each sub-block's mean is ~0, and uniform 4-bit quants,
  so the dequantized weights have mean ~0 and std ~0.02, like a real model's, and are always finite.
  The RoPE scaling factors tensor (rope_freqs.weight) of a real Llama 3 GGUF is left out: lorad does not
  read it yet, and it costs nothing to train.

The vocabulary is never smaller than the real one: the embedding and the LM head are a real cost. The
same arguments give the same file; an existing complete model is left as it is (config.json is written
last in an HF directory, a GGUF goes through a temporary name). Prints OUT.
"""
import argparse
import json
import struct
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "speed"))
import make_llama110m as base  # noqa: E402  (the word-level tokenizer shared with the speed benchmark)

# From the models' config.json files (meta-llama/Llama-3.2-1B, Llama-3.2-3B, Llama-3.1-8B).
SHAPES = {
    "llama3.2-1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, head_dim=64, intermediate=8192,
                        vocab=128256, tied=True, rope_factor=32.0),
    "llama3.2-3b": dict(hidden=3072, layers=28, heads=24, kv_heads=8, head_dim=128, intermediate=8192,
                        vocab=128256, tied=True, rope_factor=32.0),
    "llama3.1-8b": dict(hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, intermediate=14336,
                        vocab=128256, tied=False, rope_factor=8.0),
    # The writers' test: the full vocabulary (the tokenizers are the real ones' size), tiny layers.
    "mini": dict(hidden=512, layers=2, heads=8, kv_heads=2, head_dim=64, intermediate=1536,
                 vocab=128256, tied=False, rope_factor=8.0),
}
ROPE_THETA = 500000.0
MAX_POS = 131072
BOS, EOS = 128000, 128001


def rope(s):
    return {"rope_type": "llama3", "factor": s["rope_factor"], "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def config(name, s, seed):
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": s["hidden"],
        "intermediate_size": s["intermediate"],
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv_heads"],
        "head_dim": s["head_dim"],
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POS,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-5,
        # Both spellings: transformers 4 reads rope_theta/rope_scaling, 5 rope_parameters.
        "rope_theta": ROPE_THETA,
        "rope_scaling": rope(s),
        "rope_parameters": rope(s) | {"rope_theta": ROPE_THETA},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": s["tied"],
        "torch_dtype": "bfloat16",
        "dtype": "bfloat16",
        "vocab_size": s["vocab"],
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "use_cache": False,
        "shape_of": name,
        "seed_of_random_weights": seed,
    }


def hf_tensors(s):
    """(name, shape, is_norm) in the order the file stores them."""
    h, i, v, d = s["hidden"], s["intermediate"], s["vocab"], s["head_dim"]
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
    out.append(("model.norm.weight", (h,), True))
    if not s["tied"]:
        out.append(("lm_head.weight", (v, h), False))
    return out


def numel(shape):
    n = 1
    for dim in shape:
        n *= dim
    return n


def write_bf16(name, s, out: Path, seed):
    import torch

    cfg = config(name, s, seed)
    cfg_path, st_path = out / "config.json", out / "model.safetensors"
    if st_path.is_file() and cfg_path.is_file() and json.loads(cfg_path.read_text()) == cfg:
        return
    out.mkdir(parents=True, exist_ok=True)
    cfg_path.unlink(missing_ok=True)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    tensors = hf_tensors(s)
    for t_name, shape, _ in tensors:
        size = 2 * numel(shape)
        header[t_name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    g = torch.Generator().manual_seed(seed)
    tmp = st_path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for t_name, shape, is_norm in tensors:
            t = torch.ones(shape) if is_norm else torch.randn(*shape, generator=g).mul_(0.02)
            f.write(t.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
            del t
    tmp.rename(st_path)
    (out / "tokenizer.json").write_text(json.dumps(base.tokenizer(s["vocab"])) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": BOS, "eos_token_id": EOS}) + "\n")
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")  # last: its presence marks a complete model


# ---- GGUF -------------------------------------------------------------------------------------------

QK_K, Q4K_BYTES = 256, 144


def q4k_blocks(rng, n_blocks):
    """`n_blocks` random Q4_K blocks (ggml's block_q4_K), as an (n_blocks, 144) uint8 array."""
    out = np.empty((n_blocks, Q4K_BYTES), dtype=np.uint8)
    d = (rng.uniform(1.1e-4, 1.6e-4, n_blocks)).astype(np.float16)
    dmin = (d.astype(np.float32) * 8).astype(np.float16)
    out[:, 0:2] = d.view(np.uint8).reshape(n_blocks, 2)
    out[:, 2:4] = dmin.view(np.uint8).reshape(n_blocks, 2)
    sc = rng.integers(16, 48, (n_blocks, 8), dtype=np.uint8)
    # value = d*sc*q - dmin*m with q uniform in 0..15 (mean 7.5): m = 7.5 sc / 8 centres each sub-block.
    m = np.minimum(np.rint(sc.astype(np.float32) * (7.5 / 8)), 63).astype(np.uint8)
    # ggml's get_scale_min_k4, inverted: sub-blocks 0-3 in the low 6 bits of bytes 0-3 (scales) and
    # 4-7 (mins); sub-blocks 4-7 in the nibbles of bytes 8-11, their top 2 bits in the top of bytes 0-7.
    scales = np.empty((n_blocks, 12), dtype=np.uint8)
    scales[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    scales[:, 4:8] = (m[:, 0:4] & 63) | ((m[:, 4:8] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:8] & 0xF) | ((m[:, 4:8] & 0xF) << 4)
    out[:, 4:16] = scales
    out[:, 16:] = rng.integers(0, 256, (n_blocks, 128), dtype=np.uint8)
    return out


def gguf_tensors(s):
    """(gguf name, (rows, cols), is_norm) in llama.cpp's order."""
    h, i, v, d = s["hidden"], s["intermediate"], s["vocab"], s["head_dim"]
    out = [("token_embd.weight", (v, h), False)]
    for n in range(s["layers"]):
        p = f"blk.{n}"
        out += [
            (f"{p}.attn_norm.weight", (h,), True),
            (f"{p}.attn_q.weight", (s["heads"] * d, h), False),
            (f"{p}.attn_k.weight", (s["kv_heads"] * d, h), False),
            (f"{p}.attn_v.weight", (s["kv_heads"] * d, h), False),
            (f"{p}.attn_output.weight", (h, s["heads"] * d), False),
            (f"{p}.ffn_norm.weight", (h,), True),
            (f"{p}.ffn_gate.weight", (i, h), False),
            (f"{p}.ffn_up.weight", (i, h), False),
            (f"{p}.ffn_down.weight", (h, i), False),
        ]
    out.append(("output_norm.weight", (h,), True))
    if not s["tied"]:
        out.append(("output.weight", (v, h), False))
    return out


def bpe_vocab(vocab):
    """A byte-level BPE vocabulary of exactly `vocab` tokens: GPT-2's 256 byte symbols, tokens for a
    few merges (so the merge list is not empty), filler, and Llama 3's special tokens at 128000+."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    tokens = [chr(c) for c in cs]
    merges = [f"Ġ {c}" for c in "tabcdefghijklmnopqrstuvwxyz"]
    tokens += [m.replace(" ", "") for m in merges]
    tokens += [f"<filler_{k}>" for k in range(BOS - len(tokens))]
    tokens += [f"<|reserved_special_token_{k}|>" for k in range(vocab - BOS)]
    tokens[BOS], tokens[EOS] = "<|begin_of_text|>", "<|end_of_text|>"
    types = [1] * BOS + [3] * (vocab - BOS)
    return tokens, types, merges


def write_q4k(name, s, out: Path, seed):
    import gguf

    if out.is_file():
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name(f"random {name}")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    w.add_context_length(MAX_POS)
    w.add_embedding_length(s["hidden"])
    w.add_block_count(s["layers"])
    w.add_feed_forward_length(s["intermediate"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_key_length(s["head_dim"])
    w.add_value_length(s["head_dim"])
    w.add_rope_dimension_count(s["head_dim"])
    w.add_rope_freq_base(ROPE_THETA)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(s["vocab"])
    w.add_uint32("general.seed_of_random_weights", seed)
    tokens, types, merges = bpe_vocab(s["vocab"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(BOS)
    w.add_eos_token_id(EOS)
    w.add_add_bos_token(True)

    tensors = gguf_tensors(s)
    for t_name, shape, is_norm in tensors:
        if is_norm:
            w.add_tensor_info(t_name, shape, np.dtype(np.float32), 4 * shape[0])
        else:
            rows, cols = shape
            assert cols % QK_K == 0, (t_name, shape)
            byte_shape = (rows, cols // QK_K * Q4K_BYTES)
            w.add_tensor_info(t_name, byte_shape, np.dtype(np.uint8), rows * byte_shape[1],
                              raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for t_name, shape, is_norm in tensors:
        if is_norm:
            w.write_tensor_data(np.ones(shape, dtype=np.float32))
        else:
            rows, cols = shape
            w.write_tensor_data(q4k_blocks(rng, rows * cols // QK_K).reshape(rows, -1))
    w.close()
    tmp.rename(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("format", choices=["bf16", "q4k"])
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    s = SHAPES[args.shape]
    (write_bf16 if args.format == "bf16" else write_q4k)(args.shape, s, args.out, args.seed)
    print(args.out)


if __name__ == "__main__":
    main()
