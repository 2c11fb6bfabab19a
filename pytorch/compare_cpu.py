#!/usr/bin/env python3
"""The CPU engine against PyTorch eager on this machine, side by side in one run.

  python pytorch/compare_cpu.py                       # step crop 64, step crop 224, embed
  python pytorch/compare_cpu.py layers --rounds 3     # every distinct layer at crop 64
  python pytorch/compare_cpu.py step64 --rounds 5 --threads 2 --slam target/release/slam

Each round runs `slam bench ...` then `pytorch/bench_cpu.py ...` on the same work (the
order alternating between rounds), both on --threads threads (RAYON_NUM_THREADS and
torch.set_num_threads). A shared machine only ever slows a run down, so the table keeps each
side's best round (fastest median step or pass; for layers, each row's fastest time) and
prints the ratio ours / PyTorch in throughput (above 1: the CPU engine is faster).

What each item runs:
  step64   slam bench step --crop 64 --batch 64     (ResNet-18, 32 + 32 patches, 128 images)
  step224  slam bench step --crop 224 --batch 64    (the same at crop 224)
  embed    slam bench embed --crop 224 --batch 64   (eval-mode forward, 64 images per pass)
  layers   slam bench layers --crop 64 --batch 32   (each distinct conv and batch norm)
  layers224  the same at crop 224
"""

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ITEMS = {
    "step64": (["step", "--crop", "64", "--batch", "64"], ["step", "--crop", "64", "--batch", "64"]),
    "step224": (["step", "--crop", "224", "--batch", "64"], ["step", "--crop", "224", "--batch", "64"]),
    "embed": (["embed", "--crop", "224", "--batch", "64"], ["embed", "--crop", "224", "--batch", "64"]),
    "layers": (["layers", "--crop", "64", "--batch", "32"], ["layers", "--crop", "64", "--batch", "32"]),
    "layers224": (["layers", "--crop", "224", "--batch", "32"], ["layers", "--crop", "224", "--batch", "32"]),
}


def run_json(cmd, env=None):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr.strip().splitlines()


def measure(item, args):
    slam_args, torch_args = ITEMS[item]
    reps = ["--steps" if slam_args[0] == "step" else "--passes" if slam_args[0] == "embed" else "--runs",
            str(args.reps)]
    slam_cmd = [args.slam, "bench", *slam_args, *reps, "--json"]
    torch_cmd = [args.python, os.path.join(HERE, "bench_cpu.py"), *torch_args,
                 "--runs", str(args.reps), "--threads", str(args.threads)]
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    ours, theirs, header = [], [], None
    for r in range(args.rounds):
        order = [("ours", slam_cmd, env), ("torch", torch_cmd, None)]
        for side, cmd, e in order if r % 2 == 0 else order[::-1]:
            result, stderr = run_json(cmd, e)
            if side == "ours":
                ours.append(result)
                header = next((line for line in stderr if line.startswith("bench")), header)
            else:
                theirs.append(result)
    return ours, theirs, header


def report_rate(item, ours, theirs, header):
    best_ours = max(r["images_per_s"] for r in ours)
    best_torch = max(r["images_per_s"] for r in theirs)
    t = theirs[0]
    print(f"## {item}\n{header}")
    print(f"PyTorch {t['torch']} on {t['threads']} threads of {t['cpu']} (ATen SIMD level {t['simd']})")
    print("rounds (images/s): ours " + ", ".join(f"{r['images_per_s']:.1f}" for r in ours)
          + "; PyTorch " + ", ".join(f"{r['images_per_s']:.1f}" for r in theirs))
    print(f"best: ours {best_ours:.1f}, PyTorch {best_torch:.1f} images/s, ratio {best_ours / best_torch:.2f}\n")
    return dict(item=item, ours=best_ours, torch=best_torch, ratio=best_ours / best_torch)


def report_layers(item, ours, theirs, header):
    def best(results):
        rows = {}
        for result in results:
            for row in result["rows"]:
                b = rows.setdefault(row["name"], dict(row))
                b["forward_ms"] = min(b["forward_ms"], row["forward_ms"])
                b["backward_ms"] = min(b["backward_ms"], row["backward_ms"])
        return rows

    mine, torch_rows = best(ours), best(theirs)
    t = theirs[0]
    print(f"## {item}\n{header}")
    print(f"PyTorch {t['torch']} on {t['threads']} threads of {t['cpu']} (ATen SIMD level {t['simd']})")
    print("best of each row over all runs; per pass = count x (forward + backward); ratio = PyTorch ms / ours ms")
    print(f"| layer | count | ours fwd ms | PyTorch fwd ms | fwd ratio | ours bwd ms | PyTorch bwd ms | bwd ratio | ours per pass ms | PyTorch per pass ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    totals = [0.0, 0.0]
    for name, row in mine.items():
        other = torch_rows[name]
        per_pass = [row["count"] * (r["forward_ms"] + r["backward_ms"]) for r in (row, other)]
        totals = [a + b for a, b in zip(totals, per_pass)]
        print(f"| {name} | {row['count']} | {row['forward_ms']:.2f} | {other['forward_ms']:.2f} | "
              f"{other['forward_ms'] / row['forward_ms']:.2f} | {row['backward_ms']:.2f} | {other['backward_ms']:.2f} | "
              f"{other['backward_ms'] / row['backward_ms']:.2f} | {per_pass[0]:.1f} | {per_pass[1]:.1f} |")
    print(f"| all listed layers, one pass | | | | | | | | {totals[0]:.1f} | {totals[1]:.1f} |\n")
    return dict(item=item, ours=totals[0], torch=totals[1], ratio=totals[1] / totals[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("items", nargs="*", help=f"any of {', '.join(ITEMS)} (default: step64 step224 embed)")
    ap.add_argument("--slam", default=os.path.join(HERE, "..", "target", "release", "slam"))
    ap.add_argument("--python", default=sys.executable, help="the Python that has torch")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=2, help="runs of each side, alternating")
    ap.add_argument("--reps", type=int, default=3, help="timed steps, passes or runs within each run")
    args = ap.parse_args()
    unknown = [i for i in args.items if i not in ITEMS]
    if unknown:
        ap.error(f"unknown item {unknown[0]!r}: choose from {', '.join(ITEMS)}")
    summary = []
    for item in args.items or ["step64", "step224", "embed"]:
        ours, theirs, header = measure(item, args)
        summary.append(report_layers(item, ours, theirs, header) if item.startswith("layers")
                       else report_rate(item, ours, theirs, header))
    print("| item | ours | PyTorch | ratio (ours / PyTorch speed) |\n|---|---:|---:|---:|")
    for s in summary:
        unit = "ms per pass" if s["item"].startswith("layers") else "images/s"
        print(f"| {s['item']} | {s['ours']:.1f} {unit} | {s['torch']:.1f} {unit} | {s['ratio']:.2f} |")


if __name__ == "__main__":
    main()
