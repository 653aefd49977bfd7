#!/usr/bin/env python3
"""Writes the peer benchmark's dataset: long English {"text"} lines (each well over 256 tokens)."""
import json
import random
import sys

WORDS = ("the model learns from every example it reads and the daemon keeps each job safe across "
         "restarts while the trainer measures loss tokens per second and memory on a small machine "
         "with two cores where data loading must never make the accelerator wait for the next batch").split()

out, lines = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 64
rng = random.Random(0)
with open(out, "w") as f:
    for i in range(lines):
        sentences = []
        for _ in range(40):
            n = rng.randint(8, 16)
            s = " ".join(rng.choice(WORDS) for _ in range(n))
            sentences.append(s[0].upper() + s[1:] + ".")
        f.write(json.dumps({"text": " ".join(sentences)}) + "\n")
