#!/usr/bin/env python3
"""The scale benchmark's table (bench/scale.sh): one row per run or skipped run, from the manifest.

    python report.py MANIFEST --command CMD --commit C --threads N [--machine TEXT]

MANIFEST has one tab-separated line per row: shape, base file (bf16|q4k), system (lorad|peft), how the
base is held (lorad: f32 = widened at load, stored = kept as the file stores it; peft: the torch dtype),
checkpointing (on|off), batch, seq, then `ok JSON` or `skip REASON`/`fail LOG`. Prints markdown: the main
table (s/step, tokens/s, peak RSS, and the ratios to the best PEFT row of the same shape and batch x seq:
the one with most tokens/s), then how the cost grows with model size and with tokens per step.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_model  # noqa: E402

SHAPE_ORDER = ["llama3.2-1b", "llama3.2-3b", "llama3.1-8b", "mini"]


def params(shape):
    return sum(make_model.numel(s) for _, s, _ in make_model.hf_tensors(make_model.SHAPES[shape]))


def label(r):
    if r["system"] == "peft":
        return f"PyTorch + PEFT, {r['held']} base"
    held = {"f32": "widened to f32 at load", "stored": f"kept {'bf16' if r['base'] == 'bf16' else 'Q4_K'}"}
    return f"lorad, {held[r['held']]}"


def load(manifest):
    rows = []
    for line in Path(manifest).read_text().splitlines():
        if not line.strip():
            continue
        shape, base, system, held, ckpt, batch, seq, status, what = line.split("\t", 8)
        r = dict(shape=shape, base=base, system=system, held=held, ckpt=ckpt, batch=int(batch), seq=int(seq),
                 status=status, what=what)
        if status == "ok":
            d = json.loads(Path(what).read_text())
            r["s"] = d["s_per_step"]
            r["tps"] = d["tokens_per_s"]
            r["gb"] = (d["measured_mb"]["peak"] if system == "lorad" else d["peak_rss_mb"]) / 1e3
            if system == "lorad":
                r["est_gb"] = d["estimate_mb"]["total"] / 1e3
            losses = d.get("losses", [])
            r["finite"] = all(isinstance(x, (int, float)) and x == x for x in losses)
        rows.append(r)
    return rows


def key(r):
    return (SHAPE_ORDER.index(r["shape"]) if r["shape"] in SHAPE_ORDER else 99, r["batch"] * r["seq"], r["seq"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("manifest")
    ap.add_argument("--command", required=True)
    ap.add_argument("--commit", required=True)
    ap.add_argument("--threads", required=True)
    ap.add_argument("--machine", default="")
    args = ap.parse_args()
    rows = load(args.manifest)

    print(f"`{args.command}` at commit {args.commit}; {args.machine}; {args.threads} threads per run "
          "(RAYON_NUM_THREADS, torch.set_num_threads). LoRA r 16, alpha 32, dropout 0 on q,k,v,o; AdamW; "
          "random token ids / generated text, every micro-batch batch x seq tokens. s/step: median of the "
          "timed steps (the first step left out as warm-up). Peak RSS: the process's high-water mark over "
          "load and steps, GB = 10^9 bytes. \"vs best PEFT\": tokens/s and peak RSS divided by those of the "
          "PEFT row with most tokens/s at the same shape and batch x seq.\n")
    print("| shape (params) | base file | system | checkpointing | batch x seq | s/step | tokens/s "
          "| peak RSS (GB) | lorad estimate (GB) | tokens/s vs best PEFT | RSS vs best PEFT |")
    print("|---|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    groups = {}
    for r in rows:
        groups.setdefault((r["shape"], r["batch"], r["seq"]), []).append(r)
    for g in sorted(groups, key=lambda k: key(dict(shape=k[0], batch=k[1], seq=k[2]))):
        peft = [r for r in groups[g] if r["system"] == "peft" and r["status"] == "ok"]
        best = max(peft, key=lambda r: r["tps"]) if peft else None
        ordered = sorted(groups[g], key=lambda r: (r["system"] != "lorad", r["base"], r["held"], r["ckpt"]))
        for r in ordered:
            head = (f"| {r['shape']} ({params(r['shape']) / 1e9:.2f}B) | {r['base']} | {label(r)} | {r['ckpt']} "
                    f"| {r['batch']} x {r['seq']} ")
            if r["status"] != "ok":
                why = r["what"] if r["status"] == "skip" else f"failed (log: {r['what']})"
                print(head + f"| {why} | | | | | |")
                continue
            est = f"{r['est_gb']:.1f}" if "est_gb" in r else ""
            vs = (f"{r['tps'] / best['tps']:.2f} | {r['gb'] / best['gb']:.2f}") if best else "| "
            nan = "" if r["finite"] else " (NaN loss)"
            print(head + f"| {r['s']:.1f}{nan} | {r['tps']:.1f} | {r['gb']:.1f} | {est} | {vs} |")

    ok = [r for r in rows if r["status"] == "ok"]
    variants = sorted({(r["system"], r["base"], r["held"], r["ckpt"]) for r in ok})
    shapes = sorted({r["shape"] for r in ok}, key=lambda s: SHAPE_ORDER.index(s) if s in SHAPE_ORDER else 99)

    def find(v, shape, batch, seq):
        for r in ok:
            if (r["system"], r["base"], r["held"], r["ckpt"]) == v and (r["shape"], r["batch"], r["seq"]) == (
                    shape, batch, seq):
                return r
        return None

    if len(shapes) > 1:
        first = shapes[0]
        print(f"\n**Growth with model size** (1 x 512; each cell: s/step and peak RSS relative to {first}; "
              "parameters: " + ", ".join(f"{s} {params(s) / params(first):.2f}x" for s in shapes[1:]) + ")\n")
        print("| system | checkpointing | " + " | ".join(shapes[1:]) + " |")
        print("|---|---|" + "---|" * (len(shapes) - 1))
        for v in variants:
            base_row = find(v, first, 1, 512)
            if not base_row:
                continue
            cells = []
            for s in shapes[1:]:
                r = find(v, s, 1, 512)
                cells.append(f"time {r['s'] / base_row['s']:.2f}x, RSS {r['gb'] / base_row['gb']:.2f}x" if r else "")
            print(f"| {label(dict(system=v[0], base=v[1], held=v[2]))} | {v[3]} | " + " | ".join(cells) + " |")

    lines = []
    for s in shapes:
        for v in variants:
            one = find(v, s, 1, 512)
            if not one:
                continue
            for b, q in [(4, 512), (1, 2048)]:
                r = find(v, s, b, q)
                if r:
                    lines.append(f"| {s} | {label(dict(system=v[0], base=v[1], held=v[2]))} | {v[3]} | {b} x {q} "
                                 f"| {r['s'] / one['s']:.2f}x | {(r['s'] / (b * q)) / (one['s'] / 512):.2f}x "
                                 f"| {r['gb'] - one['gb']:+.1f} |")
    if lines:
        print("\n**Growth with tokens per step** (against 1 x 512 of the same row: step time, time per token, "
              "and the peak RSS added, GB; 4 x 512 grows the batch, 1 x 2048 the sequence, where attention is "
              "quadratic)\n")
        print("| shape | system | checkpointing | batch x seq | step time | time per token | RSS added |")
        print("|---|---|---|---|---:|---:|---:|")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
