#!/usr/bin/env bash
# End-to-end SLAM-AGS pretraining on one GPU, ours against PyTorch, in ONE call on the GPU
# machine (CUDA + PyTorch + torchvision, no Rust, no network):
#
#   bash pytorch/gpu-e2e.sh OUT [--slam PATH] [--quick]
#
# Runs, each under its own timeout, every log and JSON under OUT:
#   1. slam bench e2e --device cuda --json --matmul tf32     (our pretraining, reference config)
#   2. slam bench e2e --device cuda --json --matmul bf16
#   3. PyTorch (a) reference: PIL + torchvision transforms in DataLoader workers, fp32
#   4. PyTorch (b) fast: GPU data + augmentation, channels_last, bf16 autocast, torch.compile
#   5. PyTorch (b) without torch.compile (a fallback row should compile fail or time out)
#   6. step-dump parity: slam dump-step (CPU engine and --device cuda; fresh ResNet-18 at crop
#      64, and a replay of the golden small_pcgrad step) checked by pytorch/check_dump.py
# and prints ONE markdown table: variant, images/s, ratio to PyTorch (a) and (b), GPU memory,
# parity errors. A part that fails or times out is a FAILED row; the table is always printed.
# Budget: about 6-7 minutes on an H200 after the machine starts. A device call brings back at
# most 8 files, so OUT receives two: table.md and e2e-logs.tar.gz (info.txt, each part's
# output, log and status, the parity reports; not the step dumps, which are large).
#
# --slam PATH: the slam binary (default: bin/slam of .gpu/bin.tar.xz, which
#              scripts/gpu-check.sh build packs, else target/release/slam).
# --quick:     fewer steps everywhere (a smoke test of the script itself).
# PYTHON: the Python with torch (default python3).
# For a dry run without a GPU: E2E_TORCH_ARGS (extra bench_step.py flags, e.g. a tiny network
# and --device cpu) and E2E_CHECK_DEVICE (check_dump.py's device, default cuda).
set -uo pipefail
DEST=${1:?usage: bash pytorch/gpu-e2e.sh OUT [--slam PATH] [--quick]}
shift
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SLAM=""
QUICK=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --slam) SLAM=$2; shift 2 ;;
        --quick) QUICK=1; shift ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# Every part writes here; DEST gets the table and one archive at the end.
OUT="$WORK/e2e"
mkdir -p "$DEST"
if [[ -z $SLAM && -f $ROOT/.gpu/bin.tar.xz ]]; then
    # Python's tarfile where tar has no xz (the run bits are kept either way).
    tar -C "$WORK" -xJf "$ROOT/.gpu/bin.tar.xz" bin/slam 2>/dev/null ||
        "${PYTHON:-python3}" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extract("bin/slam", sys.argv[2])' \
            "$ROOT/.gpu/bin.tar.xz" "$WORK"
    [[ -x $WORK/bin/slam ]] && SLAM="$WORK/bin/slam"
fi
if [[ -z $SLAM && -x $ROOT/target/release/slam ]]; then
    SLAM="$ROOT/target/release/slam"
fi
PY=${PYTHON:-python3}
read -r -a TORCH_EXTRA <<<"${E2E_TORCH_ARGS:-}"
CHECK_DEV=${E2E_CHECK_DEVICE:-cuda}
TORCH="$ROOT/pytorch"
mkdir -p "$OUT/status"
START=$(date +%s)

# Sets WHERE to where lib NAME is, adding its folder to LD_LIBRARY_PATH unless the loader
# already knows it (as scripts/gpu-run.sh does).
find_lib() {
    local name=$1 path dir
    path=$(ldconfig -p 2>/dev/null | awk -v n="$name" 'index($1, n) == 1 { print $NF; exit }')
    if [[ -n $path ]]; then WHERE="$path (ldconfig)"; return 0; fi
    for dir in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
        /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu; do
        path=$(compgen -G "$dir/$name*" | head -n 1)
        [[ -n $path ]] && break
    done
    if [[ -z $path ]]; then
        path=$(find /usr/local /opt /usr/lib /usr/lib64 -maxdepth 10 \( -type f -o -type l \) \
            -name "$name*" 2>/dev/null | sort | head -n 1)
    fi
    [[ -z $path ]] && { WHERE="NOT FOUND"; return 1; }
    export LD_LIBRARY_PATH="$(dirname "$path")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    WHERE="$path (folder added to LD_LIBRARY_PATH)"
}

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    [[ -f $ROOT/.gpu/BUILD_INFO ]] && sed 's/^/build: /' "$ROOT/.gpu/BUILD_INFO"
    echo "slam: ${SLAM:-NOT FOUND}"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | sed 's/^/card: /'
    "$PY" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())' 2>&1
    for lib in libcuda libcublas; do find_lib "$lib.so"; echo "$lib: $WHERE"; done
    echo "cpus: $(nproc)"
} >"$OUT/info.txt" 2>&1
for lib in libcuda libcublas; do find_lib "$lib.so" >/dev/null 2>&1; done

# part NAME SECONDS CMD...: runs CMD with stdout in OUT/NAME.out, stderr in OUT/NAME.log;
# the status (ok, exit N, timeout) and seconds in OUT/status/NAME.
part() {
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS rc
    echo "[$(($(date +%s) - START)) s] $name: $*" >&2
    # through bash -c so that NAME may be one of the exported functions below
    timeout --kill-after=10 "$limit" bash -c '"$@"' _ "$@" >"$OUT/$name.out" 2>"$OUT/$name.log"
    rc=$?
    case $rc in
        0) echo "ok" ;;
        124 | 137) echo "timeout after $limit s" ;;
        *) echo "exit $rc" ;;
    esac >"$OUT/status/$name"
    echo "$((SECONDS - t0))" >>"$OUT/status/$name"
    echo "[$(($(date +%s) - START)) s] $name: $(head -n 1 "$OUT/status/$name")" >&2
}
no_slam() { echo "no slam binary (build .gpu/ with scripts/gpu-check.sh build, or pass --slam)" >&2; return 3; }
export -f no_slam
export SLAM PY TORCH OUT CHECK_DEV

if ((QUICK)); then
    E2E_STEPS=(--steps 5 --warmup 2); REF=(--steps 3 --warmup 1); FAST=(--steps 5 --warmup 3)
else
    E2E_STEPS=(); REF=(--steps 10 --warmup 3); FAST=(--steps 20 --warmup 5)
fi

# 1-2: ours at the reference configuration (its defaults).
for mode in tf32 bf16; do
    if [[ -n $SLAM ]]; then
        part "slam-$mode" 150 "$SLAM" bench e2e --device cuda --json --matmul "$mode" "${E2E_STEPS[@]}"
    else
        part "slam-$mode" 5 no_slam
    fi
done

# 3-5: PyTorch.
part torch-reference 150 "$PY" "$TORCH/bench_step.py" --mode reference "${REF[@]}" "${TORCH_EXTRA[@]}"
part torch-fast 270 "$PY" "$TORCH/bench_step.py" --mode fast --compile-mode default "${FAST[@]}" "${TORCH_EXTRA[@]}"
part torch-fast-nocompile 90 "$PY" "$TORCH/bench_step.py" --mode fast --no-compile "${FAST[@]}" "${TORCH_EXTRA[@]}"

# 6: parity. Dumps are written by slam and checked by PyTorch on the same GPU in float64
# (the exact answer for the dump's inputs and parameters): at ResNet-18 a fresh model's
# gradients are ill-conditioned enough that fp32 PyTorch is itself ~1e-2 off in g2, so only
# a float64 check says whose error it is. The CUDA dumps get tolerances x10 (another
# summation order than the CPU engine the defaults were set for).
GOLDEN="$ROOT/tests/data/small_pcgrad.safetensors"
REPLAY=(--checkpoint "$GOLDEN" --prefix before. --inputs "$GOLDEN" --surgery pcgrad --lr 0.05)
dump_and_check() {  # NAME TOL_SCALE DUMP-ARGS...
    local name=$1 scale=$2
    shift 2
    "$SLAM" dump-step --out "$OUT/$name.safetensors" "$@" >&2 || { echo "slam dump-step failed" >&2; return 4; }
    "$PY" "$TORCH/check_dump.py" "$OUT/$name.safetensors" --device "$CHECK_DEV" --float64 --tol-scale "$scale" \
        --json "$OUT/$name.check.json"
}
export -f dump_and_check
if [[ -n $SLAM ]]; then
    part dump-cpu 120 dump_and_check dump-cpu 1 --crop 64 --batch-pos 8 --batch-neg 8
    part dump-cuda 120 dump_and_check dump-cuda 10 --device cuda --crop 64 --batch-pos 8 --batch-neg 8
    part dump-cuda-golden 60 dump_and_check dump-cuda-golden 10 --device cuda "${REPLAY[@]}"
else
    for n in dump-cpu dump-cuda dump-cuda-golden; do part "$n" 5 no_slam; done
fi
# The checker against the golden files themselves (a self-test of check_dump.py on this GPU).
part golden-selftest 60 "$PY" "$TORCH/check_dump.py" "$ROOT"/tests/data/*.safetensors --device "$CHECK_DEV" \
    --json "$OUT/golden-selftest.check.json"

"$PY" "$TORCH/e2e_table.py" "$OUT" | tee "$OUT/table.md"
cp "$OUT/table.md" "$DEST/table.md"
tar -C "$WORK" --exclude='*.safetensors' -czf "$DEST/e2e-logs.tar.gz" e2e
echo "total $(($(date +%s) - START)) s; the table and e2e-logs.tar.gz in $DEST"
