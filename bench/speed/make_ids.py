#!/usr/bin/env python3
"""Writes the speed benchmark's batch: `batch` rows of `seq` random token ids, uniform over the model's
vocabulary, seeded, as JSON {"ids": [[...], ...]}. Both engines read this file, so they train on the
same tokens (no tokenizer involved).

    python make_ids.py MODEL OUT.json --batch 8 --seq 128 [--seed 0]

MODEL is an HF directory (vocab_size from config.json) or a GGUF file (rows of token_embd.weight;
needs the `gguf` package).
"""
import argparse
import json
import random
from pathlib import Path


def vocab_size(model: Path) -> int:
    if model.is_dir():
        return int(json.loads((model / "config.json").read_text())["vocab_size"])
    from gguf import GGUFReader

    for t in GGUFReader(str(model)).tensors:
        if t.name == "token_embd.weight":
            return int(t.shape[-1])  # gguf lists dimensions innermost first: [hidden, vocab]
    raise SystemExit(f"{model}: no token_embd.weight")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--seq", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    vocab = vocab_size(args.model)
    rng = random.Random(args.seed)
    ids = [[rng.randrange(vocab) for _ in range(args.seq)] for _ in range(args.batch)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"vocab_size": vocab, "seed": args.seed, "ids": ids}) + "\n")


if __name__ == "__main__":
    main()
