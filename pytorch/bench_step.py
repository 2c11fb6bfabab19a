#!/usr/bin/env python3
"""End-to-end SLAM-AGS pretraining throughput in PyTorch; prints one JSON object.

  python bench_step.py --mode reference            # as the published reference runs it
  python bench_step.py --mode fast                 # the best PyTorch can do
  python bench_step.py --mode fast --device cpu --width 8 --blocks 1,1,1,1 --out-dim 16 \
      --crop 32 --patch 40 --batch-pos 8 --batch-neg 8 --no-compile

reference: patches decoded with PIL from PNG/JPEG bytes (or read from a .patches store) and
  augmented with torchvision's PIL transforms in DataLoader workers; fp32 model (PyTorch's
  default math settings), contiguous NCHW, eager.
fast: patches as one uint8 tensor on the device, the four views made on the device in batched
  tensor ops (slam_torch.GpuAugment), channels_last, bf16 autocast, torch.compile of the model
  and of the augmentation, fused SGD; each can be turned off (--no-gpu-data keeps the uint8
  patches on the host and copies each batch's patches over).

images_per_s counts images through the network: 2 * (batch_pos + batch_neg) per step (four
forward passes); patches_per_s counts patches (batch_pos + batch_neg per step). Timed after
--warmup steps, over --steps steps, synchronizing only at both ends.
"""

import argparse
import io
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import slam_torch as st  # noqa: E402


# ---- data sources ---------------------------------------------------------------------------

def load_patches(args):
    """(u8 [N,H,W,3] array-like, labels [N] 0 normal / 1 abnormal, description)."""
    if args.store:
        pixels, labels = st.read_store(args.store)
        return pixels, labels, f"store {args.store} ({pixels.shape[0]} patches {pixels.shape[1]}x{pixels.shape[2]})"
    pixels = st.synthetic_patches(args.synthetic, args.patch, seed=args.seed)
    labels = (np.arange(args.synthetic) % 2).astype(np.uint8)
    return pixels, labels, f"synthetic {args.synthetic} patches {args.patch}x{args.patch}"


class EncodedPatches:
    """Patches held as encoded image bytes (what the reference reads from disk) or file paths."""

    def __init__(self, items):
        self.items = items

    def decode(self, i):
        from PIL import Image
        item = self.items[i]
        src = io.BytesIO(item) if isinstance(item, (bytes, bytearray)) else item
        with Image.open(src) as im:
            return im.convert("RGB")


def encode_all(pixels, fmt):
    from PIL import Image
    out = []
    for p in pixels:
        buf = io.BytesIO()
        Image.fromarray(np.asarray(p)).save(buf, format=fmt.upper(), **({"quality": 95} if fmt == "jpeg" else {}))
        out.append(buf.getvalue())
    return out


def image_folder(root):
    """root/abnormal/* and root/normal/* (or pos/neg) image files."""
    items, labels = [], []
    for label, names in ((1, ("abnormal", "pos", "positive")), (0, ("normal", "neg", "negative"))):
        for name in names:
            d = os.path.join(root, name)
            if os.path.isdir(d):
                for f in sorted(os.listdir(d)):
                    if f.lower().endswith((".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")):
                        items.append(os.path.join(d, f))
                        labels.append(label)
    if not items or len(set(labels)) < 2:
        raise SystemExit(f"{root}: needs image files under abnormal/ (or pos/) and normal/ (or neg/)")
    return items, np.array(labels, dtype=np.uint8)


# ---- (a) reference --------------------------------------------------------------------------

def reference_transforms(crop):
    from torchvision import transforms as T
    contrastive = T.Compose([
        T.RandomCrop(crop),
        T.RandomHorizontalFlip(0.5),
        T.RandomApply([T.ColorJitter(0.1, 0.1, 0.1, 0.1)], p=0.8),
        T.RandomApply([T.RandomRotation((90, 90))], p=0.8),
        T.ToTensor(),
        T.Normalize(st.MEAN, st.STD),
    ])
    center = T.Compose([T.CenterCrop(crop), T.ToTensor(), T.Normalize(st.MEAN, st.STD)])
    return contrastive, center


class ViewDataset(torch.utils.data.Dataset):
    """Positives: two contrastive views; negatives: center crop and a contrastive view."""

    def __init__(self, source, indices, positive, crop, decode_twice):
        self.source, self.indices, self.positive = source, indices, positive
        self.contrastive, self.center = reference_transforms(crop)
        self.decode_twice = decode_twice

    def __len__(self):
        return len(self.indices)

    def _image(self, i):
        from PIL import Image
        if isinstance(self.source, EncodedPatches):
            return self.source.decode(i)
        return Image.fromarray(np.asarray(self.source[i]))

    def __getitem__(self, k):
        i = int(self.indices[k])
        img = self._image(i)
        img2 = self._image(i) if self.decode_twice else img
        first = self.contrastive(img) if self.positive else self.center(img)
        return first, self.contrastive(img2)


def run_reference(args, dev):
    if args.images:
        items, labels = image_folder(args.images)
        source, desc = EncodedPatches(items), f"image files under {args.images} ({len(items)})"
    else:
        pixels, labels, desc = load_patches(args)
        if args.store and not args.encode:
            source = pixels  # PIL images made from the memory-mapped store, no decode
            desc += ", no decode (PIL images from the memmap)"
        else:
            t = time.time()
            source = EncodedPatches(encode_all(pixels, args.format))
            size = sum(len(b) for b in source.items) / len(source.items)
            desc += f", {args.format} in memory ({size / 1024:.0f} KiB each, encoded in {time.time() - t:.1f} s)"
    steps_total = args.warmup + args.steps + 2
    loaders = []
    pos_workers = max(args.workers * args.batch_pos // (args.batch_pos + args.batch_neg), 1) if args.workers else 0
    for positive, batch, workers in ((True, args.batch_pos, pos_workers),
                                     (False, args.batch_neg, max(args.workers - pos_workers, 1) if args.workers else 0)):
        idx = np.nonzero(labels == (1 if positive else 0))[0]
        ds = ViewDataset(source, idx, positive, args.crop, args.decode_twice)
        sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=batch * steps_total)
        loaders.append(torch.utils.data.DataLoader(
            ds, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True,
            pin_memory=dev.type == "cuda", persistent_workers=workers > 0,
            prefetch_factor=args.prefetch if workers > 0 else None))
    model = st.SlamNet(args.width, args.blocks, args.out_dim).to(dev)
    stepper = st.Stepper(model, surgery=args.surgery, lr=args.lr)
    iters = [iter(l) for l in loaders]

    def step():
        (pi, pj), (ni, nj) = next(iters[0]), next(iters[1])
        mv = lambda t: t.to(dev, non_blocking=True)
        return stepper.step(mv(pi), mv(pj), mv(ni), mv(nj))

    settings = dict(precision="fp32", channels_last=False, compile=False, data=desc,
                    workers=args.workers, decode_twice=args.decode_twice,
                    tf32_conv=torch.backends.cudnn.allow_tf32,
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    return step, settings


# ---- (b) fast -------------------------------------------------------------------------------

def run_fast(args, dev):
    pixels, labels, desc = load_patches(args)
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    data_dev = dev if args.gpu_data else torch.device("cpu")
    data = torch.from_numpy(np.ascontiguousarray(pixels)).to(data_dev)
    if not args.gpu_data and cuda:
        data = data.pin_memory()
    desc += f", uint8 on {data_dev} ({data.numel() / 2**20:.0f} MiB)"
    pos_idx = torch.from_numpy(np.nonzero(labels == 1)[0]).to(data_dev)
    neg_idx = torch.from_numpy(np.nonzero(labels == 0)[0]).to(data_dev)
    h, w = data.shape[1], data.shape[2]
    aug = st.GpuAugment(args.crop, h, w, dev)
    model = st.SlamNet(args.width, args.blocks, args.out_dim).to(dev)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    stepper = st.Stepper(model, surgery=args.surgery, lr=args.lr,
                         autocast_dtype=torch.bfloat16 if args.bf16 else None,
                         optim_impl="fused" if cuda else "foreach")
    contrastive, center = aug.contrastive, aug.center
    if args.compile:
        stepper.model = torch.compile(model, mode=args.compile_mode)
        contrastive = torch.compile(aug.contrastive, mode=args.compile_mode)
        center = torch.compile(aug.center, mode=args.compile_mode)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format

    def views(idx, n, positive):
        pick = idx[torch.randint(0, idx.numel(), (n,), device=idx.device)]
        patches = data[pick].to(dev, non_blocking=True)
        a = contrastive(patches) if positive else center(patches)
        b = contrastive(patches)
        return a.contiguous(memory_format=fmt), b.contiguous(memory_format=fmt)

    def step():
        pi, pj = views(pos_idx, args.batch_pos, True)
        ni, nj = views(neg_idx, args.batch_neg, False)
        return stepper.step(pi, pj, ni, nj)

    settings = dict(precision="bf16 autocast" if args.bf16 else "fp32 (TF32 allowed)" if cuda else "fp32",
                    channels_last=args.channels_last, compile=args.compile and args.compile_mode,
                    data=desc, gpu_data=args.gpu_data, cudnn_benchmark=cuda)
    return step, settings


# ---- driver ---------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["reference", "fast"], required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--arch", choices=["resnet10", "resnet18", "resnet34"], default="resnet18")
    ap.add_argument("--width", type=int, help="base width (default 64)")
    ap.add_argument("--blocks", help="blocks per stage, e.g. 1,1,1,1 (default from --arch)")
    ap.add_argument("--out-dim", type=int, default=512)
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--patch", type=int, default=250, help="side of the synthetic patches")
    ap.add_argument("--batch-pos", type=int, default=128)
    ap.add_argument("--batch-neg", type=int, default=128)
    ap.add_argument("--surgery", choices=["ags", "pcgrad", "none"], default="ags")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compile, cudnn autotune, workers)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--store", help="a slam-ags .patches store instead of synthetic patches")
    ap.add_argument("--images", help="(reference) folder with abnormal/ and normal/ image files")
    ap.add_argument("--synthetic", type=int, default=1024, help="synthetic patches (half abnormal)")
    ap.add_argument("--format", choices=["png", "jpeg"], default="png",
                    help="(reference) encoding of synthetic patches, decoded by PIL in the workers")
    ap.add_argument("--encode", action="store_true", help="(reference) encode --store patches too")
    ap.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 16),
                    help="(reference) DataLoader workers in all, split pos/neg by batch share")
    ap.add_argument("--prefetch", type=int, default=4, help="(reference) prefetch_factor")
    ap.add_argument("--decode-twice", action="store_true",
                    help="(reference) decode each image once per view, as the published code does")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--compile-mode", default="max-autotune-no-cudagraphs",
                    help="torch.compile mode (fast mode)")
    ap.add_argument("--no-bf16", dest="bf16", action="store_false")
    ap.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    ap.add_argument("--no-gpu-data", dest="gpu_data", action="store_false")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (CPU runs)")
    ap.add_argument("--json", help="also write the JSON result here")
    args = ap.parse_args()
    blocks = {"resnet10": "1,1,1,1", "resnet18": "2,2,2,2", "resnet34": "3,4,6,3"}[args.arch]
    args.blocks = tuple(int(b) for b in (args.blocks or blocks).split(","))
    args.width = args.width or 64
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"

    t0 = time.time()
    step, settings = (run_reference if args.mode == "reference" else run_fast)(args, dev)
    setup_s = time.time() - t0
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
    t0 = time.time()
    for _ in range(args.warmup):
        out = step()
    sync()
    warmup_s = time.time() - t0
    t0 = time.time()
    for _ in range(args.steps):
        out = step()
    sync()
    elapsed = time.time() - t0
    step_s = elapsed / max(args.steps, 1)
    per_step = 2 * (args.batch_pos + args.batch_neg)
    result = dict(
        variant=f"pytorch-{args.mode}",
        mode=args.mode,
        images_per_s=per_step / step_s,
        patches_per_s=(args.batch_pos + args.batch_neg) / step_s,
        step_ms=1e3 * step_s,
        steps=args.steps, warmup=args.warmup, warmup_s=warmup_s, setup_s=setup_s,
        gpu_mem_bytes=torch.cuda.max_memory_allocated(dev) if cuda else None,
        gpu_mem_reserved_bytes=torch.cuda.max_memory_reserved(dev) if cuda else None,
        loss_contrastive=float(out["loss_contrastive"]),
        loss_cohesion=float(out["loss_cohesion"]),
        device=torch.cuda.get_device_name(dev) if cuda else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        torch=torch.__version__,
        config=dict(width=args.width, blocks=list(args.blocks), out_dim=args.out_dim, crop=args.crop,
                    batch_pos=args.batch_pos, batch_neg=args.batch_neg, surgery=args.surgery),
        settings=settings,
    )
    text = json.dumps(result)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
