#!/usr/bin/env bash
# The static facts of every CUDA kernel, for when no GPU is at hand: registers, shared
# memory, stack and spills (ptxas), local-memory traffic and load/store widths (SASS), for
# sm_80 and sm_90. Needs nvcc and cuobjdump: NVCC=/path/to/nvcc, or the pinned PyPI venv.
#
#   scripts/kernel-report.sh              # every kernels/*.cu and dev/cuda/*.cu
#   scripts/kernel-report.sh ags          # kernels/ags.cu only
#   scripts/kernel-report.sh conv_igemm   # dev/cuda/conv_igemm.cu (a kernel under development)
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(ls "${SLAM_CI_CACHE:-$HOME/.cache/slam-ags}"/nvcc-venv/lib/python3*/site-packages/nvidia/cu13/bin/nvcc 2>/dev/null | head -n 1)}
[ -x "$NVCC" ] || { echo "error: no nvcc: set NVCC (see README, 'Building the CUDA kernels')" >&2; exit 1; }
BIN=$(dirname "$NVCC")
command -v cuobjdump >/dev/null || PATH=$BIN:$PATH
command -v cuobjdump >/dev/null || { echo "error: no cuobjdump: pip install --no-deps nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm into the nvcc venv" >&2; exit 1; }
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

files=()
for name in "$@"; do
    for dir in kernels dev/cuda; do
        [ -f "$dir/$name.cu" ] && files+=("$dir/$name.cu")
    done
done
[ ${#files[@]} -ge $# ] || { echo "error: no kernels/NAME.cu or dev/cuda/NAME.cu for one of: $*" >&2; exit 1; }
[ $# -gt 0 ] || files=(kernels/*.cu dev/cuda/*.cu)
for source in "${files[@]}"; do
    name=$(basename "$source" .cu)
    for arch in 80 90; do
        cubin=$TMP/$name-$arch.cubin
        echo "== $source, sm_$arch"
        "$NVCC" -O3 -cubin -arch=sm_$arch -Xptxas -v "$source" -o "$cubin" 2>&1 |
            grep -E "Compiling entry|registers|stack frame" |
            sed -E "s/ptxas info    : //; s/Compiling entry function '([A-Za-z_0-9]+)'.*/\1:/" |
            paste - - - | sed -E 's/\t+/ /g'
        for kernel in $(cuobjdump --dump-sass "$cubin" | grep -oE 'Function : [A-Za-z_0-9]+' | awk '{print $3}'); do
            sass=$(cuobjdump --dump-sass -fun "$kernel" "$cubin")
            local_ops=$(grep -cE '\b(LDL|STL)\b' <<<"$sass" || true)
            wide=$({ grep -oE '(LDG|STG|LDS|STS)\.E?\.?(128|64)[A-Z.]*' <<<"$sass" || true; } | sort | uniq -c | awk '{printf "%s x%s  ", $2, $1}')
            tensor=$(grep -cE '\b(HMMA|IMMA|DMMA|HGMMA)\b' <<<"$sass" || true)
            printf '  %-22s local-memory ops %s, tensor-core ops %s, wide accesses: %s\n' \
                "$kernel" "$local_ops" "$tensor" "${wide:-none}"
        done
    done
done
