#!/usr/bin/env python3
"""The memory benchmark's table (bench/memory.sh): one row per run of engine/examples/peak.rs.

    python report.py --commit C --threads N NAME JSON [NAME JSON ...]

Columns: the model, batch x seq, the estimate and the measured peak RSS (decimal MB), their ratio, where
the measured peak was (load or step), and the estimate's parts.
"""
import argparse
import json

PARTS = ["baseline", "weights", "lora", "optimizer", "activations", "workspace", "fragmentation", "loading"]
SHORT = {"baseline": "base", "weights": "W", "lora": "LoRA", "optimizer": "opt", "activations": "act",
         "workspace": "ws", "fragmentation": "frag", "loading": "load"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--commit", required=True)
    ap.add_argument("--threads", required=True)
    ap.add_argument("runs", nargs="+")
    args = ap.parse_args()
    runs = list(zip(args.runs[::2], args.runs[1::2]))
    print(f"Commit {args.commit}; RAYON_NUM_THREADS={args.threads}; LoRA r 16 on q,k,v,o; MB = 10^6 bytes.\n")
    print("| model | batch x seq | dropout | estimate (MB) | measured peak RSS (MB) | ratio | peak at | estimate's parts (MB) |")
    print("|---|---|---|---:|---:|---:|---|---|")
    for name, path in runs:
        d = json.load(open(path))
        e, m = d["estimate_mb"], d["measured_mb"]
        step = max(m["step_peak"], m["finish_peak"])
        where = "load" if m["load_peak"] >= step else "step"
        parts = ", ".join(f"{SHORT[p]} {e[p]:.0f}" for p in PARTS if e.get(p, 0) >= 0.5)
        print(f"| {name} | {d['batch']} x {d['seq']} | {d['dropout']:g} | {e['total']:.0f} | {m['peak']:.0f} "
              f"| {e['total'] / m['peak']:.3f} | {where} | {parts} |")
    print("\nMeasured, per run: load peak / step peak (after each step) / finish peak, MB")
    for name, path in runs:
        m = json.load(open(path))["measured_mb"]
        steps = " / ".join(f"{s:.0f}" for s in m["step_peaks"])
        print(f"- {name}: {m['load_peak']:.0f} / {steps} / {m['finish_peak']:.0f}")


if __name__ == "__main__":
    main()
