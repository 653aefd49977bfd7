#!/usr/bin/env python3
"""Prints the speed benchmark's table for one model from the two engines' JSON files.

    python report.py NAME LORAD.json TORCH.json

Ratios are lorad / PyTorch: above 1 lorad takes longer (ms rows) or goes faster (tokens/s).
"""
import json
import sys

CLASSES = ["matmul", "attention", "norms", "elementwise", "cross_entropy"]


def ratio(a, b):
    return f"{a / b:.2f}x" if b else "-"


def main():
    name, lorad_path, torch_path = sys.argv[1:4]
    lo, pt = json.load(open(lorad_path)), json.load(open(torch_path))
    print(f"### {name}: batch {lo['batch']} x seq {lo['seq']}, {lo['threads']} threads, f32, LoRA r16 on q,k,v,o "
          f"(dropout {lo.get('dropout', 0.0)}) "
          f"({lo['params'] / 1e6:.1f}M base params); median of {lo['steps']} steps after {lo['warmup']} warm-up")
    print()
    print("| | lorad | PyTorch + PEFT | lorad/PyTorch |")
    print("|---|---:|---:|---:|")
    for key, label in [("fwd", "fwd ms"), ("bwd", "bwd ms"), ("opt", "opt ms"), ("step", "step ms")]:
        a, b = lo["phases_ms"][key], pt["phases_ms"][key]
        print(f"| {label} | {a:.1f} | {b:.1f} | {ratio(a, b)} |")
    print(f"| tokens/s | {lo['tokens_per_s']:.0f} | {pt['tokens_per_s']:.0f} | "
          f"{ratio(lo['tokens_per_s'], pt['tokens_per_s'])} |")
    print(f"| peak RSS MiB | {lo['peak_rss_mb']:.0f} | {pt['peak_rss_mb']:.0f} | "
          f"{ratio(lo['peak_rss_mb'], pt['peak_rss_mb'])} |")
    sums = {"lo": [0.0, 0.0], "pt": [0.0, 0.0]}
    for c in CLASSES:
        a, b = lo["op_classes_ms"][c], pt["op_classes_ms"][c]
        for side, v in (("lo", a), ("pt", b)):
            sums[side][0] += v["fwd"]
            sums[side][1] += v["bwd"]
        print(f"| {c} fwd / bwd ms | {a['fwd']:.1f} / {a['bwd']:.1f} | {b['fwd']:.1f} / {b['bwd']:.1f} | "
              f"{ratio(a['fwd'], b['fwd'])} / {ratio(a['bwd'], b['bwd'])} |")
    (lf, lb), (pf, pb) = sums["lo"], sums["pt"]
    print(f"| op classes sum fwd / bwd ms | {lf:.1f} / {lb:.1f} | {pf:.1f} / {pb:.1f} | "
          f"{ratio(lf, pf)} / {ratio(lb, pb)} |")
    print(f"| first loss | {lo['losses'][0]:.5f} | {pt['losses'][0]:.5f} | |")
    print()
    print(f"lorad/PyTorch tokens/s: {lo['tokens_per_s'] / pt['tokens_per_s']:.2f}x; "
          f"peak RSS: {lo['peak_rss_mb'] / pt['peak_rss_mb']:.2f}x")
    print(f"({pt['version']}; op classes: each op class's forward and backward timed alone at this model's "
          f"shapes, times its count per step; 'sum' vs the measured fwd / bwd shows what the classes leave out)")


if __name__ == "__main__":
    main()
