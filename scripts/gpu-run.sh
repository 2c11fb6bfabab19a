#!/usr/bin/env bash
# Runs on the GPU machine as .gpu/run (scripts/gpu-check.sh build puts it there): every GPU
# test executable of .gpu/tests, `slam bench kernels`, the training step at the reference
# configuration (`slam bench step`, TF32 and bf16) and end to end (`slam bench e2e`), full
# logs into OUT, a summary last. About 5 minutes on an H200.
#   bash .gpu/run OUT [--sanitize]
# --sanitize also runs the kernel tests under compute-sanitizer (memcheck, racecheck).
# Needs no Rust and no network; finds libcuda and libcublas through ldconfig, else searches
# the usual places and puts their folder on LD_LIBRARY_PATH.
set -uo pipefail
OUT=${1:?usage: bash .gpu/run OUT [--sanitize]}
SANITIZE=${2:-}
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mkdir -p "$OUT"
INFO="$OUT/info.txt"
: >"$INFO"

# Sets WHERE to where lib NAME (e.g. libcublas.so) is, and adds its folder to LD_LIBRARY_PATH
# unless the dynamic loader already knows it.
find_lib() {
    local name=$1 path dir
    path=$(ldconfig -p 2>/dev/null | awk -v n="$name" 'index($1, n) == 1 { print $NF; exit }')
    if [[ -n $path ]]; then
        WHERE="$path (ldconfig)"
        return 0
    fi
    for dir in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
        /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu; do
        path=$(compgen -G "$dir/$name*" | head -n 1)
        [[ -n $path ]] && break
    done
    if [[ -z $path ]]; then
        path=$(find /usr/local /opt /usr/lib /usr/lib64 -maxdepth 10 \
            \( -type f -o -type l \) -name "$name*" 2>/dev/null | sort | head -n 1)
    fi
    if [[ -z $path ]]; then
        WHERE="NOT FOUND"
        return 1
    fi
    export LD_LIBRARY_PATH="$(dirname "$path")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    WHERE="$path (its folder added to LD_LIBRARY_PATH)"
}

{
    echo "== build"
    cat "$HERE/BUILD_INFO"
    echo "== nvidia-smi"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1
    nvidia-smi 2>&1 | head -n 15
} >>"$INFO" 2>&1
for lib in libcuda libcublas libnvrtc; do
    find_lib "$lib.so"
    echo "$lib: $WHERE" >>"$INFO"
done
echo "(libnvrtc is needed only for kernels without a fatbin)" >>"$INFO"
echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}" >>"$INFO"
export SLAM_REQUIRE_GPU=1 RUST_BACKTRACE=1

declare -A RESULT
# run_test NAME [FILTER...]: one test executable, its log in OUT/test-NAME.log.
run_test() {
    local name=$1
    shift
    local log="$OUT/test-$name.log"
    timeout 300 "$HERE/tests/$name" --test-threads=1 --nocapture "$@" >"$log" 2>&1
    local rc=$?
    local counts
    counts=$(grep -h '^test result:' "$log" | tail -n 1 | sed 's/^test result: //; s/; finished.*//')
    case $rc in
        0) RESULT[$name]="PASS  $counts" ;;
        124) RESULT[$name]="TIMEOUT (300 s)" ;;
        *) RESULT[$name]="FAIL (exit $rc)  $counts" ;;
    esac
}
TESTS=()
for exe in "$HERE"/tests/cuda_*; do
    TESTS+=("$(basename "$exe")")
done
for name in "${TESTS[@]}"; do
    run_test "$name"
done
run_test lib engine::cuda
TESTS+=(lib)

SAN=()
if [[ $SANITIZE == --sanitize ]]; then
    if command -v compute-sanitizer >/dev/null; then
        for tool in memcheck racecheck; do
            log="$OUT/sanitizer-$tool.log"
            timeout 400 compute-sanitizer --tool "$tool" --error-exitcode 99 \
                "$HERE/tests/cuda_ops" --test-threads=1 >"$log" 2>&1
            rc=$?
            SAN+=("$tool: $(case $rc in 0) echo clean ;; 124) echo TIMEOUT ;; 99) echo ERRORS FOUND ;; *) echo "exit $rc" ;; esac) ($(tail -n 1 "$log"))")
        done
    else
        SAN+=("compute-sanitizer not found")
    fi
fi

# bench NAME TIMEOUT ARGS...: one benchmark, its output in OUT/bench-NAME.log.
declare -A BENCH
bench() {
    local name=$1 limit=$2
    shift 2
    timeout "$limit" "$HERE/slam" "$@" >"$OUT/bench-$name.log" 2>&1
    BENCH[$name]=$?
}
BENCHES=(kernels igemm step-tf32 step-bf16 step-exact e2e-tf32)
bench kernels 240 bench kernels
# The implicit-GEMM convolution under development against the engine's (its check ran as
# tests/cuda_conv_igemm).
timeout 120 "$HERE/conv_igemm" --no-check >"$OUT/bench-igemm.log" 2>&1
BENCH[igemm]=$?
REF=(--crop 224 --batch 256 --warmup 3 --steps 10)
bench step-tf32 120 bench step --device cuda --matmul tf32 "${REF[@]}"
bench step-bf16 120 bench step --device cuda --matmul bf16 "${REF[@]}"
bench step-exact 120 bench step --device cuda --matmul exact --crop 224 --batch 256 --warmup 1 --steps 3
bench e2e-tf32 180 bench e2e --device cuda --matmul tf32

{
    echo
    echo "==== GPU check summary ===="
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 |
            sed 's/^/card:   /'
    else
        echo "card:   unknown (no nvidia-smi on this machine)"
    fi
    sed -n '1p' "$HERE/BUILD_INFO" | sed 's/^/build:  /'
    grep -E '^lib(cuda|cublas):' "$INFO" | sed 's/^/        /'
    for name in "${TESTS[@]}"; do
        printf 'test %-16s %s\n' "$name" "${RESULT[$name]}"
    done
    for line in "${SAN[@]}"; do
        echo "sanitizer $line"
    done
    for name in "${BENCHES[@]}"; do
        echo "bench $name (exit ${BENCH[$name]}):"
        grep -v '^\s*$' "$OUT/bench-$name.log" | tail -n 25 | sed 's/^/  /'
    done
    echo "logs: $(cd "$OUT" && ls | tr '\n' ' ')"
} | tee "$OUT/summary.txt"
