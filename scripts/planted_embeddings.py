#!/usr/bin/env python3
"""Embeddings files with a planted signal, for comparing MIL heads where the answer is known.

Every instance is a standard-normal vector of DIM features; in an abnormal bag, WITNESSES of
the BAG_SIZE instances are shifted by SHIFT along one fixed random unit direction (the same
for every bag). Half of the bags are abnormal. Writes TRAIN and TEST files in the format of
`slam embed` (safetensors: features, bag_offsets, bag_labels, instance_labels, and the
bag names, sources and feature kind as metadata), so `slam mil train` reads them.

    scripts/planted_embeddings.py OUT_DIR [--bags 48] [--bag-size 50] [--witnesses 5]
        [--dim 64] [--shift 2.0] [--seed 0]

Standard library only: the direction from random.Random(seed), the training bags from
random.Random(2 seed + 1), the test bags from random.Random(2 seed + 2).
"""

import argparse
import json
import math
import os
import random
import struct


def bags(rng, direction, count, bag_size, witnesses, shift):
    """(name, label, rows, truth) for `count` bags, alternating abnormal and normal."""
    out = []
    for b in range(count):
        abnormal = b % 2 == 0
        truth = [abnormal and i < witnesses for i in range(bag_size)]
        rng.shuffle(truth)
        rows = []
        for t in truth:
            row = [rng.gauss(0.0, 1.0) for _ in direction]
            if t:
                row = [v + shift * d for v, d in zip(row, direction)]
            rows.append(row)
        name = f"{'abnormal' if abnormal else 'normal'}_{b // 2}"
        out.append((name, abnormal, rows, truth))
    return out


def write(path, dim, content):
    features = [v for _, _, rows, _ in content for row in rows for v in row]
    offsets, total = [0], 0
    for _, _, rows, _ in content:
        total += len(rows)
        offsets.append(total)
    tensors = [
        ("features", "F32", [total, dim], struct.pack(f"<{len(features)}f", *features)),
        ("bag_offsets", "I64", [len(offsets)], struct.pack(f"<{len(offsets)}q", *offsets)),
        (
            "bag_labels",
            "I64",
            [len(content)],
            struct.pack(f"<{len(content)}q", *[int(label) for _, label, _, _ in content]),
        ),
        (
            "instance_labels",
            "I64",
            [total],
            struct.pack(f"<{total}q", *[int(t) for _, _, _, truth in content for t in truth]),
        ),
    ]
    info = {
        "bag_names": [name for name, _, _, _ in content],
        "sources": [f"{name}/{i}" for name, _, rows, _ in content for i in range(len(rows))],
        "features": "projector",
    }
    header, start = {"__metadata__": {"slam_ags": json.dumps(info)}}, 0
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [start, start + len(data)]}
        start += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for _, _, _, data in tensors:
            f.write(data)
    os.replace(tmp, path)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--bags", type=int, default=48)
    p.add_argument("--bag-size", type=int, default=50)
    p.add_argument("--witnesses", type=int, default=5)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--shift", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if not (0 <= a.witnesses <= a.bag_size and a.bags >= 2 and a.dim >= 1):
        p.error("need 0 <= --witnesses <= --bag-size, --bags >= 2, --dim >= 1")
    rng = random.Random(a.seed)
    direction = [rng.gauss(0.0, 1.0) for _ in range(a.dim)]
    norm = math.sqrt(sum(v * v for v in direction))
    direction = [v / norm for v in direction]
    os.makedirs(a.out, exist_ok=True)
    for split, stream in (("train", 2 * a.seed + 1), ("test", 2 * a.seed + 2)):
        content = bags(random.Random(stream), direction, a.bags, a.bag_size,
                       a.witnesses, a.shift)
        write(os.path.join(a.out, f"{split}.embed.safetensors"), a.dim, content)


if __name__ == "__main__":
    main()
