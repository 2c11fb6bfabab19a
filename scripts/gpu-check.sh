#!/usr/bin/env bash
# The GPU check, in two halves (docs/GPU.md):
#   scripts/gpu-check.sh build    here (Rust, the pinned nvcc): builds the release binary, the
#                                 dev kernel programs (dev/cuda) and the GPU test executables,
#                                 gathers them into .gpu/ with the run script
#                                 (scripts/gpu-run.sh as .gpu/run);
#   bash .gpu/run "$OUT"          on the GPU machine (no Rust, no network): runs them and the
#                                 kernel benchmark, logs into $OUT, a summary last.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

usage() {
    echo "usage: scripts/gpu-check.sh build" >&2
    exit 2
}
[[ $# -eq 1 && $1 == build ]] || usage

# The pinned nvcc of .ci/run unless NVCC is set: every kernel must be compiled into the
# fatbin (a GPU machine may lack NVRTC).
if [[ -z ${NVCC:-} ]]; then
    NVCC="$(echo "${SLAM_CI_CACHE:-$HOME/.cache/slam-ags}"/nvcc-venv/lib/python3*/site-packages/nvidia/cu13/bin/nvcc)"
fi
[[ -x $NVCC ]] || {
    echo "error: no nvcc at $NVCC: run .ci/run once (it installs the pinned one) or set NVCC" >&2
    exit 1
}
export NVCC SLAM_REQUIRE_NVCC=1

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

rm -rf .gpu
mkdir -p .gpu/tests
strip -g -o .gpu/slam target/release/slam
strip -g -o .gpu/conv_igemm target/release/examples/conv_igemm
for line in "${execs[@]}"; do
    read -r kind name exe <<<"$line"
    case $kind in
        lib) dest=lib ;;
        test) dest=$name ;;
        *) continue ;;
    esac
    strip -g -o ".gpu/tests/$dest" "$exe"
done
[[ -x .gpu/tests/cuda_ops && -x .gpu/tests/cuda_engine && -x .gpu/tests/lib ]] || {
    echo "error: the test executables were not found in cargo's output" >&2
    exit 1
}
cp scripts/gpu-run.sh .gpu/run
{
    echo "commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . || echo ' (with uncommitted changes)')"
    echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -srm)"
    "$NVCC" --version | tail -n 2 | head -n 1
} >.gpu/BUILD_INFO

size=$(du -sb .gpu | cut -f1)
limit=$((64 << 20))
((size < limit)) || {
    echo "error: .gpu is $size bytes, over the 64 MiB a device call carries" >&2
    exit 1
}
echo "gathered .gpu/ ($((size >> 20)) MiB):"
ls -l .gpu .gpu/tests
echo 'next, on the GPU machine (device tool: carry [".gpu"]): bash .gpu/run "$OUT"'
