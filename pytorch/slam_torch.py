"""SLAM-AGS pretraining step in PyTorch, written for slam-ags from docs/METHOD.md (sections 3-6).

Shared by bench_step.py (speed) and check_dump.py (parity): the network with the reference
state_dict names, the two losses, the surgery (AGS / PCGrad / none) on flat gradients, the
SGD update, batched GPU augmentation and a reader for the packed patch store.
"""

import json
import math
import struct

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ---- network --------------------------------------------------------------------------------

MEAN = (0.6009, 0.5513, 0.7394)
STD = (0.1982, 0.2448, 0.1076)
EPS_SURGERY = 1e-10


def make_encoder(width=64, blocks=(2, 2, 2, 2)):
    """torchvision's ResNet without fc as nn.Sequential(conv1, bn1, relu, maxpool, layer1..4,
    avgpool): names encoder.0 (conv), encoder.1 (bn), encoder.{4+i} (stage i), as the reference.

    At width 64 and blocks 2,2,2,2 this is torchvision.models.resnet18() itself; other shapes
    are the same modules (torchvision's BasicBlock) at another base width and depth.
    """
    import torchvision
    from torchvision.models.resnet import BasicBlock

    if width == 64 and tuple(blocks) == (2, 2, 2, 2):
        net = torchvision.models.resnet18()
        return nn.Sequential(*list(net.children())[:-1])
    conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    layers = [conv1, nn.BatchNorm2d(width), nn.ReLU(inplace=True),
              nn.MaxPool2d(kernel_size=3, stride=2, padding=1)]
    cin = width
    for stage, count in enumerate(blocks):
        cout = width << stage
        stage_blocks = []
        for b in range(count):
            stride = 2 if stage > 0 and b == 0 else 1
            down = None
            if stride != 1 or cin != cout:
                down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                     nn.BatchNorm2d(cout))
            stage_blocks.append(BasicBlock(cin, cout, stride, down))
            cin = cout
        layers.append(nn.Sequential(*stage_blocks))
    layers.append(nn.AdaptiveAvgPool2d((1, 1)))
    return nn.Sequential(*layers)


class Projector(nn.Module):
    def __init__(self, dim, out_dim):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, out_dim))

    def forward(self, h):
        return self.fc(h)


class SlamNet(nn.Module):
    """ResNet encoder (h, 8*width features) + projector (z, out_dim)."""

    def __init__(self, width=64, blocks=(2, 2, 2, 2), out_dim=512):
        super().__init__()
        self.encoder = make_encoder(width, blocks)
        self.projector = Projector(8 * width, out_dim)

    def forward(self, x):
        return self.projector(torch.flatten(self.encoder(x), 1))


def config_from_state(state, prefix=""):
    """(width, blocks, out_dim) of a state_dict stored under prefix."""
    width = state[prefix + "encoder.0.weight"].shape[0]
    blocks = []
    for stage in range(4):
        b = 0
        while f"{prefix}encoder.{4 + stage}.{b}.conv1.weight" in state:
            b += 1
        blocks.append(b)
    out_dim = state[prefix + "projector.fc.2.weight"].shape[0]
    return width, tuple(blocks), out_dim


# ---- losses ---------------------------------------------------------------------------------

def ntxent(z_i, z_j, temperature):
    """NT-Xent over the 2n rows [z_i; z_j]; the partner of row a is a + n (mod 2n)."""
    f = F.normalize(torch.cat([z_i, z_j]), dim=1, eps=1e-12)
    n2 = f.shape[0]
    n = n2 // 2
    s = f @ f.t() / temperature
    s = s.masked_fill(torch.eye(n2, dtype=torch.bool, device=s.device), float("-inf"))
    target = torch.cat([torch.arange(n, n2), torch.arange(0, n)]).to(s.device)
    return F.cross_entropy(s, target)


def cohesion(z_i, z_j, temperature):
    """(1 - mean_{a != b} f_a.f_b) / T over the m = 2n unit rows, in O(m d)."""
    f = F.normalize(torch.cat([z_i, z_j]), dim=1, eps=1e-12)
    m = f.shape[0]
    s = f.sum(0)
    off_diag = (s * s).sum() - (f * f).sum()
    return (1.0 - off_diag / (m * (m - 1))) / temperature


# ---- surgery + SGD --------------------------------------------------------------------------

def combine_host(d, a, b, surgery):
    """alpha, beta, fired, cosine of g = alpha g1 + beta g2 from d = g1.g2, a = |g1|^2,
    b = |g2|^2 (Python floats, f64), exactly as src/model/surgery.rs computes them."""
    norm_sum = math.sqrt(max(a + b + 2 * d, 0.0))
    cosine = d / (math.sqrt(a) * math.sqrt(b)) if a > 0 and b > 0 else 0.0
    fired = surgery != "none" and d < 0
    c1 = c2 = 0.0
    if fired:
        c1 = 0.0 if b == 0 else d / (b + EPS_SURGERY)
        c2 = 0.0 if a == 0 else d / (a + EPS_SURGERY)
    w1, w2 = 1.0 - c2, 1.0 - c1
    norm_proj = math.sqrt(max(w1 * w1 * a + w2 * w2 * b + 2 * w1 * w2 * d, 0.0))
    floor = 1e-6 * (abs(w1) * math.sqrt(a) + abs(w2) * math.sqrt(b))
    if fired and norm_proj <= floor:
        scale = 0.0
    elif surgery == "ags" and norm_proj > 0:
        scale = norm_sum / (norm_proj + EPS_SURGERY)
    else:
        scale = 1.0
    return dict(alpha=w1 * scale, beta=w2 * scale, fired=fired, cosine=cosine,
                norm_g1=math.sqrt(a), norm_g2=math.sqrt(b), norm_sum=norm_sum,
                norm_combined=norm_proj * scale)


def combine_device(g1, g2, surgery):
    """The same coefficients as 0-d f64 tensors on the gradients' device (no host sync)."""
    x, y = g1.double(), g2.double()
    d, a, b = torch.dot(x, y), torch.dot(x, x), torch.dot(y, y)
    zero = torch.zeros((), dtype=torch.float64, device=g1.device)
    one = zero + 1.0
    if surgery == "none":
        return one, one
    fired = d < 0
    c1 = torch.where(fired & (b != 0), d / (b + EPS_SURGERY), zero)
    c2 = torch.where(fired & (a != 0), d / (a + EPS_SURGERY), zero)
    w1, w2 = 1.0 - c2, 1.0 - c1
    norm_proj = torch.sqrt(torch.clamp(w1 * w1 * a + w2 * w2 * b + 2 * w1 * w2 * d, min=0.0))
    floor = 1e-6 * (w1.abs() * a.sqrt() + w2.abs() * b.sqrt())
    if surgery == "ags":
        norm_sum = torch.sqrt(torch.clamp(a + b + 2 * d, min=0.0))
        scale = torch.where(norm_proj > 0, norm_sum / (norm_proj + EPS_SURGERY), one)
    else:
        scale = one
    scale = torch.where(fired & (norm_proj <= floor), zero, scale)
    return w1 * scale, w2 * scale


def flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


def set_flat_grads(params, g):
    """p.grad = the matching view of the flat gradient g (parameters() order)."""
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = g[offset:offset + n].view_as(p)
        offset += n


class Stepper:
    """One SLAM-AGS step: four forward passes (pos_i, pos_j, neg_i, neg_j; BN in training
    mode, each pass its own batch), g1 from the positives' NT-Xent, g2 from the negatives'
    cohesion, surgery on the flat gradients, torch.optim.SGD (momentum, weight decay)."""

    def __init__(self, model, surgery="ags", lr=1e-3, momentum=0.9, weight_decay=1e-4,
                 temperature=0.07, autocast_dtype=None, optim_impl=None, task_weights=(1.0, 1.0)):
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.surgery = surgery
        # (l1, l2): the surgery combines l1 g1 and l2 g2 (g1, g2 are returned unweighted).
        self.task_weights = task_weights
        self.temperature = temperature
        self.autocast_dtype = autocast_dtype
        kw = {}
        if optim_impl == "fused":
            kw["fused"] = True
        elif optim_impl == "foreach":
            kw["foreach"] = True
        elif optim_impl == "loop":
            kw["foreach"] = False
        self.opt = torch.optim.SGD(self.params, lr=lr, momentum=momentum,
                                   weight_decay=weight_decay, **kw)

    def _forward(self, x):
        if self.autocast_dtype is None:
            return self.model(x)
        with torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype):
            return self.model(x).float()

    def task(self, x_i, x_j, loss_fn):
        z_i = self._forward(x_i)
        z_j = self._forward(x_j)
        loss = loss_fn(z_i.float(), z_j.float(), self.temperature)
        grads = torch.autograd.grad(loss, self.params)
        return loss.detach(), flat(grads)

    def step(self, pos_i, pos_j, neg_i, neg_j, host_report=False):
        self.model.train()
        loss1, g1 = self.task(pos_i, pos_j, ntxent)
        loss2, g2 = self.task(neg_i, neg_j, cohesion)
        l1, l2 = self.task_weights
        if host_report:
            d = torch.dot(g1.double(), g2.double()).item() * l1 * l2
            a = torch.dot(g1.double(), g1.double()).item() * l1 * l1
            b = torch.dot(g2.double(), g2.double()).item() * l2 * l2
            report = combine_host(d, a, b, self.surgery)
            # Coefficients of the unweighted gradients, rounded to f32 as the fused update takes them.
            alpha = torch.tensor(report["alpha"] * l1, dtype=torch.float32)
            beta = torch.tensor(report["beta"] * l2, dtype=torch.float32)
            g = alpha.to(g1.device) * g1 + beta.to(g1.device) * g2
        else:
            report = None
            alpha, beta = combine_device(l1 * g1, l2 * g2, self.surgery)
            g = (alpha * l1).float() * g1 + (beta * l2).float() * g2
        set_flat_grads(self.params, g)
        self.opt.step()
        return dict(loss_contrastive=loss1, loss_cohesion=loss2, g1=g1, g2=g2, combined=g,
                    report=report)


# ---- GPU-batched augmentation (torchvision float-tensor semantics, per-image parameters) ----

def _gray(x):
    r, g, b = x.unbind(-3)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


def _rgb_to_hsv(x):
    r, g, b = x.unbind(-3)
    maxc = x.amax(-3)
    minc = x.amin(-3)
    same = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(same, ones, maxc)
    div = torch.where(same, ones, cr)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return h, s, maxc


def _hsv_to_rgb(h, s, v):
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int32) % 6
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    # sector i: (r, g, b) = (v,t,p) (q,v,p) (p,v,t) (p,q,v) (t,p,v) (v,p,q)
    sel = lambda c0, c1, c2, c3, c4, c5: torch.where(
        i == 0, c0, torch.where(i == 1, c1, torch.where(i == 2, c2, torch.where(
            i == 3, c3, torch.where(i == 4, c4, c5)))))
    r = sel(v, q, p, p, t, v)
    g = sel(t, v, v, q, p, p)
    b = sel(p, p, t, v, v, q)
    return torch.stack([r, g, b], -3)


def _adjust_hue(x, shift):
    h, s, v = _rgb_to_hsv(x)
    h = torch.remainder(h + shift.view(-1, 1, 1), 1.0)
    return _hsv_to_rgb(h, s, v)


def jitter_batch(x, apply, order, factors):
    """Color jitter on a batch x [B,3,H,W] in [0,1]: for the images where apply is set, the
    four ops in each image's own order (order [B,4] of op ids 0 brightness, 1 contrast,
    2 saturation, 3 hue), factors [B,4]; every op clamps to [0,1] (torchvision's blend)."""
    view = lambda t: t.view(-1, 1, 1, 1)
    for k in range(4):
        op = torch.where(apply, order[:, k], torch.full_like(order[:, k], -1))
        f = factors.gather(1, order[:, k:k + 1]).squeeze(1)
        is_b, is_c, is_s, is_h = op == 0, op == 1, op == 2, op == 3
        ratio = torch.where(is_b | is_c | is_s, f, torch.ones_like(f))
        gray = _gray(x)
        mean = gray.mean(dim=(-3, -2, -1), keepdim=True)
        ref = torch.where(view(is_c), mean, torch.where(view(is_s), gray, torch.zeros_like(gray)))
        blended = (view(ratio) * x + (1.0 - view(ratio)) * ref).clamp(0.0, 1.0)
        x = torch.where(view(is_b | is_c | is_s), blended, x)
        hue_shift = torch.where(is_h, f, torch.zeros_like(f))
        x = torch.where(view(is_h), _adjust_hue(x, hue_shift), x)
    return x


def center_offset(diff):
    """round-half-even(diff / 2), torchvision's CenterCrop offset."""
    return int(round(diff / 2.0))


class GpuAugment:
    """The four views of a batch from u8 HWC patches already on the device: one gather for
    crop + flip + rotation (+90, counter-clockwise, after the flip), jitter on floats,
    normalize. Output NCHW in channels_last memory (the gather writes NHWC)."""

    def __init__(self, crop, height, width, device, flip_p=0.5, jitter_p=0.8, strength=0.1,
                 hue=0.1, rotate_p=0.8):
        self.crop, self.h, self.w, self.device = crop, height, width, device
        self.flip_p, self.jitter_p, self.rotate_p = flip_p, jitter_p, rotate_p
        self.lo = torch.tensor([1 - strength, 1 - strength, 1 - strength, -hue], device=device)
        self.hi = torch.tensor([1 + strength, 1 + strength, 1 + strength, hue], device=device)
        self.mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
        self.ar = torch.arange(crop, device=device)

    def _gather(self, patches, top, left, flip, rotate):
        c = self.crop
        y = self.ar.view(1, c, 1)
        x = self.ar.view(1, 1, c)
        flip = flip.view(-1, 1, 1)
        rotate = rotate.view(-1, 1, 1)
        # output (y, x) reads crop pixel: none (y, x), flip (y, c-1-x), rot (x, c-1-y), both (x, y)
        sy = torch.where(rotate, x.expand(-1, c, c), y.expand(-1, c, c))
        sx = torch.where(rotate, torch.where(flip, y, c - 1 - y).expand(-1, c, c),
                         torch.where(flip, c - 1 - x, x).expand(-1, c, c))
        rows = top.view(-1, 1, 1) + sy
        cols = left.view(-1, 1, 1) + sx
        b = torch.arange(patches.shape[0], device=patches.device).view(-1, 1, 1)
        out = patches[b, rows, cols]  # [B, c, c, 3] u8
        return out.permute(0, 3, 1, 2).float().div_(255.0)  # NCHW view, channels_last memory

    def contrastive(self, patches):
        n = patches.shape[0]
        dev = self.device
        top = torch.randint(0, self.h - self.crop + 1, (n,), device=dev)
        left = torch.randint(0, self.w - self.crop + 1, (n,), device=dev)
        flip = torch.rand(n, device=dev) < self.flip_p
        rotate = torch.rand(n, device=dev) < self.rotate_p
        x = self._gather(patches, top, left, flip, rotate)
        apply = torch.rand(n, device=dev) < self.jitter_p
        order = torch.rand(n, 4, device=dev).argsort(dim=1)
        factors = self.lo + (self.hi - self.lo) * torch.rand(n, 4, device=dev)
        x = jitter_batch(x, apply, order, factors)
        return (x - self.mean) / self.std

    def center(self, patches):
        c = self.crop
        t, l = center_offset(self.h - c), center_offset(self.w - c)
        x = patches[:, t:t + c, l:l + c, :].permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self.mean) / self.std


# ---- the packed patch store (src/data/store.rs), read with numpy -----------------------------

STORE_MAGIC = b"SLAMPATC"


def read_store(path):
    """Memory-maps a .patches store. Layout (little-endian): header at 0 (magic 'SLAMPATC',
    u32 version, u32 header_bytes, u32 patch_height, u32 patch_width, u32 channels,
    u32 bag_count, u64 patch_count, u64 bags_offset, u64 instances_offset, u64 sources_offset,
    u64 text_offset, u64 text_len, u64 file_len, u32 crc32 x 3, 5 x u32 reserved); pixels at
    4096: patch_count x H x W x 3 u8, bag after bag; the bag table at bags_offset: bag_count x
    32 bytes (u64 first_patch, u64 patch_count, u64 name_start, u32 name_len, u32 label 0/1).
    Returns (pixels [N,H,W,3] memmap, per-patch bag label array (0 normal, 1 abnormal))."""
    with open(path, "rb") as fh:
        head = fh.read(128)
    if head[:8] != STORE_MAGIC:
        raise ValueError(f"{path}: not a slam-ags patch store (magic {head[:8]!r})")
    version, _hb, ph, pw, ch, bag_count = struct.unpack_from("<6I", head, 8)
    patch_count, bags_offset = struct.unpack_from("<2Q", head, 32)
    if version != 1 or ch != 3:
        raise ValueError(f"{path}: store version {version}, channels {ch} not supported")
    pixels = np.memmap(path, dtype=np.uint8, mode="r", offset=4096,
                       shape=(patch_count, ph, pw, 3))
    bags = np.fromfile(path, dtype=np.uint8, count=bag_count * 32, offset=bags_offset)
    bags = bags.reshape(bag_count, 32)
    labels = np.zeros(patch_count, dtype=np.uint8)
    for rec in bags:
        first, count = struct.unpack_from("<2Q", rec, 0)
        (label,) = struct.unpack_from("<I", rec, 28)
        labels[first:first + count] = label
    return pixels, labels


def synthetic_patches(count, side=250, seed=0):
    """Smooth random RGB patches (u8 [count, side, side, 3]): low-frequency color fields plus
    grain, so PNG/JPEG sizes and decode times look like real cell patches, not like noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(count, 3, 8, 8, generator=g)
    up = F.interpolate(low, size=(side, side), mode="bilinear", align_corners=False)
    grain = 0.05 * torch.randn(count, 3, side, side, generator=g)
    x = (0.25 + 0.6 * up + grain).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


_ST_DTYPES = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32,
              "F16": np.float16, "U8": np.uint8}


def load_safetensors(path):
    """(dict name -> CPU tensor, metadata dict) of a safetensors file, read with numpy only
    (the GPU machines have PyTorch but maybe not the safetensors package). Layout: u64 LE
    header length, JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {..}},
    then the data."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
        raw = np.fromfile(fh, dtype=np.uint8, offset=0)
    meta = header.pop("__metadata__", {}) or {}
    tensors = {}
    for name, h in header.items():
        if h["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{path}: {name} has dtype {h['dtype']}, not supported here")
        start, end = h["data_offsets"]
        arr = raw[start:end].view(_ST_DTYPES[h["dtype"]]).reshape(h["shape"])
        tensors[name] = torch.from_numpy(arr.copy())
    return tensors, meta


def dumps(obj):
    return json.dumps(obj, sort_keys=True)
