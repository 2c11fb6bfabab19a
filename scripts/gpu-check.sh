#!/usr/bin/env bash
# The GPU check, in two halves (docs/GPU.md):
#   scripts/gpu-check.sh build    here (Rust, the pinned nvcc): builds the release binary, the
#                                 dev kernel programs (dev/cuda) and the GPU test executables;
#                                 .gpu/ then holds `run` (scripts/gpu-run.sh), `bin.tar.xz`
#                                 (every executable, stripped, run bits kept) and BUILD_INFO.
#                                 Prints the size of what a device call carries.
#   bash .gpu/run "$OUT"          on the GPU machine (no Rust, no network): unpacks, runs every
#                                 GPU test in its own process, the benchmarks, under one
#                                 deadline; one status line per step, the verdicts last; into
#                                 $OUT only summary.txt and logs.tar.gz.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

usage() {
    echo "usage: scripts/gpu-check.sh build" >&2
    exit 2
}
[[ $# -eq 1 && $1 == build ]] || usage

# What a device call carries: tracked files, untracked files git does not ignore, and .gpu/.
LIMIT_MIB=48

# nvcc: $NVCC, else the pinned venv .ci/run creates (under $SLAM_CI_CACHE), else PATH. Every
# kernel must be compiled into the fatbin (a GPU machine may lack NVRTC).
find_nvcc() {
    if [[ -n ${NVCC:-} ]]; then
        echo "$NVCC"
        return
    fi
    local venv="${SLAM_CI_CACHE:-$HOME/.cache/slam-ags}/nvcc-venv" site
    if [[ -x $venv/bin/python ]]; then
        site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
        if [[ -x $site/nvidia/cu13/bin/nvcc ]]; then
            echo "$site/nvidia/cu13/bin/nvcc"
            return
        fi
    fi
    command -v nvcc || true
}
NVCC="$(find_nvcc)"
[[ -n $NVCC && -x $NVCC ]] || {
    echo "error: no nvcc: set NVCC, or run .ci/run once (it installs the pinned one under" \
        "${SLAM_CI_CACHE:-$HOME/.cache/slam-ags}/nvcc-venv)" >&2
    exit 1
}
export NVCC SLAM_REQUIRE_NVCC=1
echo "nvcc: $NVCC"

cargo build --release --bin slam --example conv_igemm
# The test executables, from cargo's JSON messages: the GPU integration tests (every
# tests/cuda_*.rs) and the library's unit tests (whose engine::cuda tests open the GPU).
GPU_TESTS=()
for t in tests/cuda_*.rs; do
    GPU_TESTS+=(--test "$(basename "$t" .rs)")
done
mapfile -t execs < <(
    cargo test --release --no-run --message-format=json "${GPU_TESTS[@]}" --lib |
        jq -r 'select(.reason == "compiler-artifact" and .executable != null)
               | "\(.target.kind[0]) \(.target.name) \(.executable)"'
)

STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/bin/tests"
strip -g -o "$STAGE/bin/slam" target/release/slam
strip -g -o "$STAGE/bin/conv_igemm" target/release/examples/conv_igemm
for line in "${execs[@]}"; do
    read -r kind name exe <<<"$line"
    case $kind in
        lib) dest=lib ;;
        test) dest=$name ;;
        *) continue ;;
    esac
    strip -g -o "$STAGE/bin/tests/$dest" "$exe"
done
for want in cuda_ops cuda_engine cuda_kernels lib; do
    [[ -x $STAGE/bin/tests/$want ]] || {
        echo "error: the test executable $want was not found in cargo's output" >&2
        exit 1
    }
done

rm -rf .gpu
mkdir -p .gpu
tar -C "$STAGE" -cJf .gpu/bin.tar.xz bin
cp scripts/gpu-run.sh .gpu/run
{
    echo "commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . || echo ' (with uncommitted changes)')"
    echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -srm)"
    "$NVCC" --version | tail -n 2 | head -n 1
} >.gpu/BUILD_INFO

# The travelling tree: what git sends (tracked, and untracked but not ignored) plus .gpu/.
sent=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } |
    xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
gpu=$(du -sb .gpu | cut -f1)
total=$((sent + gpu))
awk -v t="$total" -v s="$sent" -v g="$gpu" -v l="$LIMIT_MIB" 'BEGIN {
    m = 1048576
    printf "travelling: %.1f MiB (files %.1f MiB + .gpu %.1f MiB; limit %d MiB)\n", t / m, s / m, g / m, l
}'
((total < LIMIT_MIB << 20)) || {
    echo "error: the device call would carry $total bytes, over $LIMIT_MIB MiB" >&2
    exit 1
}
ls -l .gpu
tar -tJvf .gpu/bin.tar.xz | awk '{printf "  %10s %s\n", $3, $6}'
echo 'next, on the GPU machine (device tool: carry [".gpu"]): bash .gpu/run "$OUT"'
