#!/usr/bin/env python3
"""Renders the one markdown table of pytorch/gpu-e2e.sh from what its parts left in OUT.

  python e2e_table.py OUT

Speed rows read the last JSON object printed on OUT/<part>.out (images_per_s, gpu_mem_bytes,
and for slam `compute`); parity rows read OUT/<part>.check.json (check_dump.py --json). A
part whose status (OUT/status/<part>) is not "ok", or whose output has no result, is a FAILED
row with the reason and the last line of its log.
"""

import json
import os
import sys

SPEED = [
    ("slam-tf32", "slam, TF32"),
    ("slam-bf16", "slam, bf16"),
    ("torch-reference", "PyTorch (a) reference"),
    ("torch-fast", "PyTorch (b) fast"),
    ("torch-fast-nocompile", "PyTorch (b) fast, no compile"),
]
PARITY = [
    ("dump-cpu", "parity: slam CPU engine dump vs PyTorch"),
    ("dump-cuda", "parity: slam CUDA engine dump vs PyTorch"),
    ("dump-cuda-golden", "parity: slam CUDA replay of golden small_pcgrad"),
    ("golden-selftest", "parity: check_dump.py on the golden files"),
]


def read(path):
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return ""


def status(out, name):
    lines = read(os.path.join(out, "status", name)).split()
    text = read(os.path.join(out, "status", name)).splitlines()
    return (text[0] if text else "not run"), (lines[-1] if len(text) > 1 else "?")


def last_json(text):
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def log_tail(out, name):
    lines = [l for l in read(os.path.join(out, name + ".log")).splitlines() if l.strip()]
    return lines[-1][:160].replace("|", "/") if lines else ""


def gib(x):
    return f"{x / 2**30:.1f} GiB" if isinstance(x, (int, float)) and x else "-"


def main():
    out = sys.argv[1]
    info = read(os.path.join(out, "info.txt"))
    speed = {}
    for name, _ in SPEED:
        st, secs = status(out, name)
        res = last_json(read(os.path.join(out, name + ".out")))
        speed[name] = (st, secs, res if res and "images_per_s" in res else None)
    ref_a = speed["torch-reference"][2]
    ref_b = speed["torch-fast"][2]
    b_note = ""
    if not ref_b and speed["torch-fast-nocompile"][2]:
        ref_b, b_note = speed["torch-fast-nocompile"][2], " (b) = the no-compile row: compiled run failed."
    lines = []
    for l in info.splitlines():
        if l.startswith(("card:", "date:", "commit:", "torch ")):
            lines.append(f"{l}  ")
    lines.append("")
    lines.append("| variant | images/s | x PyTorch (a) | x PyTorch (b) | GPU memory | parity / notes |")
    lines.append("|---|---:|---:|---:|---:|---|")
    for name, label in SPEED:
        st, secs, res = speed[name]
        if st != "ok" or res is None:
            why = st if st != "ok" else "no JSON result"
            lines.append(f"| {label} | FAILED | - | - | - | {why}: {log_tail(out, name)} |")
            continue
        ips = res["images_per_s"]
        ra = f"{ips / ref_a['images_per_s']:.2f}x" if ref_a else "-"
        rb = f"{ips / ref_b['images_per_s']:.2f}x" if ref_b else "-"
        mem = res.get("gpu_mem_bytes")
        notes = []
        if "compute" in res:
            notes.append(f"compute {res['compute']}")
        if "step_ms" in res:
            notes.append(f"{res['step_ms']:.1f} ms/step")
        s = res.get("settings") or {}
        if s:
            notes.append(", ".join(f"{k} {s[k]}" for k in ("precision", "compile", "workers") if k in s))
        notes.append(f"{secs} s wall")
        lines.append(f"| {label} | {ips:,.0f} | {ra} | {rb} | {gib(mem)} | {'; '.join(notes)} |")
    for name, label in PARITY:
        st, secs = status(out, name)
        try:
            checks = json.loads(read(os.path.join(out, name + ".check.json")))
        except ValueError:
            checks = None
        if not checks:
            lines.append(f"| {label} | FAILED | - | - | - | {st}: {log_tail(out, name)} |")
            continue
        parts = []
        for c in checks:
            if "error" in c:
                parts.append(f"{os.path.basename(c['file'])}: cannot check ({c['error'][:80]})")
                continue
            verdict = "PASS" if c["ok"] else "FAIL"
            parts.append(f"{os.path.basename(c['file'])} {verdict}: loss {c['loss_rel']:.1e}, "
                         f"grads {c['grad_rel']:.1e}, params {c['param_rel']:.1e}, "
                         f"update {c['update_rel']:.1e}, running {c['running_rel']:.1e}")
        ok = st == "ok"
        lines.append(f"| {label} | {'ok' if ok else 'FAILED'} | - | - | - | "
                     f"{'; '.join(parts)} (relative errors; {secs} s) |")
    lines.append("")
    lines.append("images/s = images through the network per second (2 x (pos + neg) per step: "
                 "four forward passes). Parity: worst relative (L2) error per quantity; slam dumps "
                 "checked against PyTorch float64, the golden self-test in fp32, on the same GPU." + b_note)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
