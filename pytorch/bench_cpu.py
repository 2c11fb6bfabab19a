#!/usr/bin/env python3
"""PyTorch's side of the CPU speed comparison: the same work `slam bench step|embed|layers`
times, in PyTorch eager fp32 on the CPU, at the same shapes and thread count.

  python pytorch/bench_cpu.py step  --crop 64  --batch 64 --threads 2
  python pytorch/bench_cpu.py embed --crop 224 --batch 64 --threads 2
  python pytorch/bench_cpu.py layers --crop 64 --batch 32 --threads 2 [--json out.json]

step:   one SLAM-AGS training step (slam_torch.Stepper: four training-mode passes of
        batch/2 images each, both losses, flat gradients, AGS, SGD) on random normal inputs;
        images/s counts 2 x batch images per step, as `slam bench step`.
embed:  one eval-mode forward pass of batch images to the projector output, under
        torch.inference_mode (what `slam embed` computes); images/s counts batch images.
layers: every distinct convolution and batch norm of one training pass of batch images,
        each op alone on random operands: convolution forward, convolution backward (input
        and weight gradients; the stem's weight gradient only, as the step needs), batch norm
        training forward with ReLU, and its backward through the ReLU mask.
Each figure is the median of --runs timed runs after --warmup untimed ones. Prints one JSON
object (and writes it to --json).
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import slam_torch as st  # noqa: E402


def timed(fn, warmup, runs):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bench_step(args):
    model = st.SlamNet(64, args.blocks, args.out_dim)
    stepper = st.Stepper(model, surgery="ags", lr=1e-3, optim_impl="foreach")
    n_pos = args.batch // 2
    n_neg = args.batch - n_pos
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(n, 3, args.crop, args.crop, generator=g) for n in (n_pos, n_pos, n_neg, n_neg)]
    seconds = timed(lambda: stepper.step(*views), args.warmup, args.runs)
    images = 2 * args.batch
    return dict(images_per_step=images, median_step_ms=1e3 * seconds, images_per_s=images / seconds)


def bench_embed(args):
    model = st.SlamNet(64, args.blocks, args.out_dim).eval()
    x = torch.randn(args.batch, 3, args.crop, args.crop, generator=torch.Generator().manual_seed(0))

    def forward():
        with torch.inference_mode():
            model(x)

    seconds = timed(forward, args.warmup, args.runs)
    return dict(median_pass_ms=1e3 * seconds, images_per_s=args.batch / seconds)


def conv_shapes(crop, blocks):
    """(cin, cout, kernel, stride, input side, count) of each distinct convolution of one
    pass, in network order: the same list `slam bench layers` derives from its network."""
    out = lambda size, k, s: (size + 2 * (k // 2) - k) // s + 1  # noqa: E731
    stem = out(crop, 7, 2)
    shapes = [(3, 64, 7, 2, crop)]
    size, cin = (stem + 2 - 3) // 2 + 1, 64
    for stage, count in enumerate(blocks):
        cout = 64 << stage
        for b in range(count):
            stride = 2 if stage > 0 and b == 0 else 1
            if stride != 1 or cin != cout:
                shapes.append((cin, cout, 1, stride, size))
            shapes.append((cin, cout, 3, stride, size))
            size = out(size, 3, stride)
            shapes.append((cout, cout, 3, 1, size))
            cin = cout
    distinct = {}
    for s in shapes:
        distinct[s] = distinct.get(s, 0) + 1
    return [(*s, n) for s, n in distinct.items()]


def bench_layers(args):
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.rand(*shape, generator=g) * 2 - 1  # noqa: E731
    n = args.batch
    rows = []
    bn_shapes = {}
    for index, (cin, cout, k, stride, size, count) in enumerate(conv_shapes(args.crop, args.blocks)):
        pad = k // 2
        x, w = rand(n, cin, size, size), rand(cout, cin, k, k)
        y = F.conv2d(x, w, stride=stride, padding=pad)
        dy = rand(*y.shape)
        stem = index == 0  # the step needs no input gradient of the stem
        mask = [not stem, True, False]
        fwd = timed(lambda: F.conv2d(x, w, stride=stride, padding=pad), args.warmup, args.runs)
        bwd = timed(lambda: torch.ops.aten.convolution_backward(
            dy, x, w, None, [stride, stride], [pad, pad], [1, 1], False, [0, 0], 1, mask),
            args.warmup, args.runs)
        macs = n * y.shape[2] * y.shape[3] * cout * cin * k * k
        rows.append(dict(op="conv", name=f"conv{k}x{k}/{stride} {cin}->{cout} @{size}", count=count,
                         forward_ms=1e3 * fwd, backward_ms=1e3 * bwd, macs=macs))
        key = (cout, y.shape[2])
        bn_shapes[key] = bn_shapes.get(key, 0) + count
    for (c, size), count in bn_shapes.items():
        x = rand(n, c, size, size)
        gamma, beta = torch.ones(c), torch.zeros(c)
        rm, rv = torch.zeros(c), torch.ones(c)
        y = torch.relu(F.batch_norm(x, rm, rv, gamma, beta, True, 0.1, 1e-5))
        dy0 = rand(*x.shape)

        def forward():
            out, _, _, _, _ = torch.ops.aten._native_batch_norm_legit_functional(
                x, gamma, beta, rm, rv, True, 0.1, 1e-5)
            return torch.relu_(out)

        _, save_mean, save_invstd = torch.ops.aten.native_batch_norm(x, gamma, beta, rm, rv, True, 0.1, 1e-5)

        def backward():
            dy = torch.ops.aten.threshold_backward(dy0, y, 0.0)
            return torch.ops.aten.native_batch_norm_backward(
                dy, x, gamma, rm, rv, save_mean, save_invstd, True, 1e-5, [True, True, True])

        fwd = timed(forward, args.warmup, args.runs)
        bwd = timed(backward, args.warmup, args.runs)
        rows.append(dict(op="bn", name=f"bn+relu {c} @{size}", count=count,
                         forward_ms=1e3 * fwd, backward_ms=1e3 * bwd, bytes=4 * x.numel()))
    return dict(rows=rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["step", "embed", "layers"])
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64,
                    help="step: patches per step (half positive); embed: images per pass; layers: images per pass")
    ap.add_argument("--blocks", default="2,2,2,2", help="blocks per stage (ResNet-18: 2,2,2,2)")
    ap.add_argument("--out-dim", type=int, default=512)
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: PyTorch's)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", help="also write the JSON result here")
    args = ap.parse_args()
    args.blocks = tuple(int(b) for b in args.blocks.split(","))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    run = dict(step=bench_step, embed=bench_embed, layers=bench_layers)[args.what]
    result = dict(what=args.what, crop=args.crop, batch=args.batch, **run(args),
                  cpu=cpu_model(), threads=torch.get_num_threads(), torch=torch.__version__,
                  simd=torch.backends.cpu.get_cpu_capability())
    text = json.dumps(result)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
