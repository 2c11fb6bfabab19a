#!/usr/bin/env python3
"""Self-test of slam_torch's batched augmentation against torchvision's functional ops on
float tensors (the semantics of docs/METHOD.md section 2, Views): geometry and each jitter
op, per image."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
import torchvision.transforms.functional as TF  # noqa: E402

import slam_torch as st  # noqa: E402

OPS = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]


def main():
    g = torch.Generator().manual_seed(0)
    n, side, crop = 12, 20, 16
    patches = (torch.rand(n, side, side, 3, generator=g) * 255).round().to(torch.uint8)
    aug = st.GpuAugment(crop, side, side, torch.device("cpu"))
    top = torch.randint(0, side - crop + 1, (n,), generator=g)
    left = torch.randint(0, side - crop + 1, (n,), generator=g)
    flip = torch.arange(n) % 2 == 0
    rot = torch.arange(n) % 4 < 2
    got = aug._gather(patches, top, left, flip, rot)
    worst = 0.0
    for i in range(n):
        x = patches[i].permute(2, 0, 1).float() / 255
        x = x[:, top[i]:top[i] + crop, left[i]:left[i] + crop]
        if flip[i]:
            x = TF.hflip(x)
        if rot[i]:
            x = torch.rot90(x, 1, dims=(-2, -1))  # +90 degrees, counter-clockwise
        worst = max(worst, (got[i] - x).abs().max().item())
    print(f"geometry: max abs diff {worst:.2e}")
    assert worst == 0.0

    x = torch.rand(n, 3, crop, crop, generator=g)
    apply = torch.arange(n) % 5 != 0
    order = torch.rand(n, 4, generator=g).argsort(1)
    factors = torch.stack([0.9 + 0.2 * torch.rand(n, generator=g) for _ in range(3)]
                          + [-0.1 + 0.2 * torch.rand(n, generator=g)], 1)
    got = st.jitter_batch(x, apply, order, factors)
    worst = 0.0
    for i in range(n):
        y = x[i]
        if apply[i]:
            for op in order[i].tolist():
                y = OPS[op](y, factors[i, op].item())
        worst = max(worst, (got[i] - y).abs().max().item())
    print(f"jitter vs torchvision.transforms.functional: max abs diff {worst:.2e}")
    assert worst < 1e-5, worst
    print("ok")


if __name__ == "__main__":
    main()
