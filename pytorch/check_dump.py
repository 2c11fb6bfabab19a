#!/usr/bin/env python3
"""Checks a `slam dump-step` file (or a golden file of tests/data) against the same
step computed in PyTorch.

  python check_dump.py step.safetensors [--device cpu|cuda] [--float64] [--json OUT.json]

A dump holds input.{pos_i,pos_j,neg_i,neg_j}, loss.{contrastive,cohesion}, grad.{contrastive,
cohesion,combined} (flat, parameters() order), before.<name> / after.<name> (full state_dict)
and the metadata "slam_ags" = {"config": {width, blocks, out_dim}, "step": {surgery, sgd:
{lr, momentum, weight_decay}, temperature, task_weights}, "report": {lr, combination: {fired, cosine,..}}}.
A golden file holds the same per step under step1./step2. and its case in the metadata
"config". The model is rebuilt from the state_dict, loaded with strict=True, and the step(s)
run deterministically (no TF32); every quantity is compared and the exit status is 1 when any
is above its tolerance (see --help and README.md), 2 when the file cannot be checked.
"""

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import slam_torch as st  # noqa: E402

VIEWS = ("pos_i", "pos_j", "neg_i", "neg_j")


def load(path):
    return st.load_safetensors(path)


def describe(path, tensors, meta):
    """(kind, steps, hyper-parameters, report per step) of a dump or a golden file."""
    if "slam_ags" in meta:
        info = json.loads(meta["slam_ags"])
        step = info["step"]
        sgd = step["sgd"]
        report = info.get("report", {})
        hp = dict(surgery=step["surgery"], lr=report.get("lr", sgd["lr"]),
                  momentum=sgd["momentum"], weight_decay=sgd["weight_decay"],
                  temperature=step["temperature"], config=info.get("config"),
                  engine=info.get("engine"), task_weights=tuple(step.get("task_weights", (1.0, 1.0))))
        comb = report.get("combination", {})
        return "dump", [("", comb.get("fired"), comb.get("cosine"))], hp
    if "config" in meta and "step1.loss.contrastive" in tensors:
        cfg = json.loads(meta["config"])
        hp = dict(surgery=cfg["surgery"], lr=cfg["lr"], momentum=cfg["momentum"],
                  weight_decay=cfg["weight_decay"], temperature=cfg["temperature"],
                  config=dict(width=cfg["width"], blocks=cfg["blocks"], out_dim=cfg["out_dim"]),
                  engine="golden (torch %s)" % cfg.get("torch"))
        steps = []
        for s in cfg["steps"]:
            steps.append((f"step{s['step']}.", s.get("surgery_fired"), s.get("cos_g1_g2")))
        return "golden", steps, hp
    raise ValueError(f"{path}: neither a slam dump-step file (metadata 'slam_ags') nor a "
                     f"golden file (metadata 'config' and step1.*)")


def err(ours, ref):
    """max |a-b|, relative L2 error |a-b|/|b| (f64)."""
    a = ours.detach().double().cpu().reshape(-1)
    b = ref.detach().double().cpu().reshape(-1)
    diff = a - b
    denom = b.norm().item()
    rel = diff.norm().item() / denom if denom > 0 else diff.norm().item()
    return diff.abs().max().item() if diff.numel() else 0.0, rel


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--float64", action="store_true",
                    help="run PyTorch in float64 (errors then measure the dump's own rounding)")
    ap.add_argument("--tol-loss", type=float, default=1e-4, help="relative, each loss")
    ap.add_argument("--tol-loss-abs", type=float, default=1e-5,
                    help="absolute floor for the losses: a loss also passes within this "
                         "(f32 cancellation in 1 - mean cos near collapse is ~ulp(1)/T)")
    ap.add_argument("--tol-grad", type=float, default=2e-3,
                    help="relative L2, g1, g2, combined and the parameter update after - before")
    ap.add_argument("--tol-param", type=float, default=1e-5, help="relative L2, parameters after")
    ap.add_argument("--tol-running", type=float, default=1e-4, help="relative L2, running stats")
    ap.add_argument("--tol-scale", type=float, default=1.0,
                    help="multiply every tolerance (e.g. 10 for a TF32/bf16 dump)")
    ap.add_argument("--json", help="write the results as JSON here")
    args = ap.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)
    if args.device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    dtype = torch.float64 if args.float64 else torch.float32
    dev = torch.device(args.device)
    s = args.tol_scale
    tol = dict(loss=args.tol_loss * s, loss_abs=args.tol_loss_abs * s, grad=args.tol_grad * s, param=args.tol_param * s,
               running=args.tol_running * s)

    all_ok = True
    unreadable = False
    results = []
    for path in args.files:
        try:
            tensors, meta = load(path)
            kind, steps, hp = describe(path, tensors, meta)
            before = {k[len("before."):]: v for k, v in tensors.items() if k.startswith("before.")}
            width, blocks, out_dim = st.config_from_state(before)
            if hp["config"]:
                want = (hp["config"]["width"], tuple(hp["config"]["blocks"]), hp["config"]["out_dim"])
                if want != (width, blocks, out_dim):
                    raise ValueError(f"metadata config {want} != tensors {(width, blocks, out_dim)}")
            model = st.SlamNet(width, blocks, out_dim)
            model.load_state_dict(before, strict=True)
            model.to(device=dev, dtype=dtype)
            stepper = st.Stepper(model, surgery=hp["surgery"], lr=hp["lr"],
                                 momentum=hp["momentum"], weight_decay=hp["weight_decay"],
                                 temperature=hp["temperature"], optim_impl="loop",
                                 task_weights=hp.get("task_weights", (1.0, 1.0)))
            names = [n for n, _ in model.named_parameters()]
            x = [tensors[f"input.{v}"].to(device=dev, dtype=dtype) for v in VIEWS]
        except Exception as e:  # a file we cannot check at all
            print(f"{path}: cannot check: {e}", file=sys.stderr)
            results.append(dict(file=path, ok=False, error=str(e)))
            unreadable = True
            continue

        print(f"== {path} ({kind}, {hp['engine']}): width {width} blocks {blocks} out_dim "
              f"{out_dim}, crop {x[0].shape[-1]}, pos {x[0].shape[0]} + neg {x[2].shape[0]}, "
              f"surgery {hp['surgery']}, lr {hp['lr']}; PyTorch {torch.__version__} "
              f"{dtype} on {dev}")
        print(f"  {'quantity':<30} {'max abs err':>12} {'rel err':>12} {'tolerance':>10}  ok")
        file_rows = []
        prev = {n: p.detach().clone() for n, p in model.named_parameters()}
        for prefix, fired_ref, cos_ref in steps:
            out = stepper.step(*x, host_report=True)
            rows = []

            def row(name, ours, ref, limit, abs_limit=0.0):
                m, r = err(ours, ref)
                ok = (r <= limit or m <= abs_limit) and math.isfinite(r)
                rows.append(dict(quantity=prefix + name, max_abs=m, rel=r, tol=limit, ok=ok))

            row("loss.contrastive", out["loss_contrastive"], tensors[prefix + "loss.contrastive"], tol["loss"],
                tol["loss_abs"])
            row("loss.cohesion", out["loss_cohesion"], tensors[prefix + "loss.cohesion"], tol["loss"],
                tol["loss_abs"])
            row("grad.contrastive (g1)", out["g1"], tensors[prefix + "grad.contrastive"], tol["grad"])
            row("grad.cohesion (g2)", out["g2"], tensors[prefix + "grad.cohesion"], tol["grad"])
            row("grad.combined", out["combined"], tensors[prefix + "grad.combined"], tol["grad"])
            after_prefix = prefix + "after."
            sd = model.state_dict()
            params = [n for n in names]
            ours_p = torch.cat([sd[n].double().cpu().reshape(-1) for n in params])
            ref_p = torch.cat([tensors[after_prefix + n].double().reshape(-1) for n in params])
            row("after: parameters", ours_p, ref_p, tol["param"])
            # The update itself (after - before of this step): the sharp test of the SGD step.
            prev_p = torch.cat([prev[n].double().cpu().reshape(-1) for n in params])
            ref_prev = prev_p if prefix in ("", "step1.") else torch.cat(
                [tensors[f"step{int(prefix[4]) - 1}.after." + n].double().reshape(-1) for n in params])
            row("after: update (after-before)", ours_p - prev_p, ref_p - ref_prev, tol["grad"])
            running = [n for n in sd if n.endswith("running_mean") or n.endswith("running_var")]
            ours_r = torch.cat([sd[n].double().cpu().reshape(-1) for n in running])
            ref_r = torch.cat([tensors[after_prefix + n].double().reshape(-1) for n in running])
            row("after: running stats", ours_r, ref_r, tol["running"])
            tracked = [n for n in sd if n.endswith("num_batches_tracked")]
            bad = [n for n in tracked if int(sd[n]) != int(tensors[after_prefix + n])]
            rows.append(dict(quantity=prefix + "after: num_batches_tracked", max_abs=float(len(bad)),
                             rel=0.0 if not bad else 1.0, tol=0.0, ok=not bad))
            rep = out["report"]
            if fired_ref is not None:
                rows.append(dict(quantity=prefix + f"surgery fired ({rep['fired']}, cos {rep['cosine']:+.4f})",
                                 max_abs=abs(rep["cosine"] - (cos_ref or 0.0)), rel=0.0, tol=0.0,
                                 ok=bool(rep["fired"]) == bool(fired_ref)))
            for r in rows:
                print(f"  {r['quantity']:<30} {r['max_abs']:12.3e} {r['rel']:12.3e} {r['tol']:10.1e}  "
                      f"{'ok' if r['ok'] else 'FAIL'}")
            file_rows += rows
            prev = {n: p.detach().clone() for n, p in model.named_parameters()}
        ok = all(r["ok"] for r in file_rows)
        all_ok &= ok
        worst = lambda key: max((r["rel"] for r in file_rows if key in r["quantity"]), default=0.0)
        summary = dict(file=path, kind=kind, ok=ok, dtype=str(dtype), device=str(dev),
                       loss_rel=max(worst("loss.contrastive"), worst("loss.cohesion")),
                       grad_rel=max(worst("grad."), 0.0), param_rel=worst("parameters"),
                       update_rel=worst("update"), running_rel=worst("running"), rows=file_rows)
        results.append(summary)
        print(f"  -> {'PASS' if ok else 'FAIL'}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    sys.exit(2 if unreadable else 0 if all_ok else 1)


if __name__ == "__main__":
    main()
