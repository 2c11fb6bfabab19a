#!/usr/bin/env bash
# Runs on the GPU machine as .gpu/run (scripts/gpu-check.sh build puts it there; docs/GPU.md):
# every GPU test in its own process, then the benchmarks (`slam bench kernels`, the implicit-
# GEMM convolution, the training step at the reference configuration with TF32, bf16 and
# exact products, and end to end), all under one deadline.
#   bash .gpu/run OUT [--sanitize]
# --sanitize also runs the operator tests under compute-sanitizer (memcheck).
#
# Built for a device call that brings back at most 8 files and the last 12,000 characters of
# output: OUT receives only summary.txt (machine, verdicts, every benchmark's output) and
# logs.tar.gz (every step's full log); one status line is printed as each step finishes, and
# the verdict table is printed last. SLAM_GPU_DEADLINE (seconds, default 540) bounds the whole
# run: each step gets the smaller of its own limit and the time left, and a step that cannot
# get its minimum is skipped (and says so). Needs no Rust and no network; finds libcuda and
# libcublas through ldconfig, else searches the usual places and puts their folder on
# LD_LIBRARY_PATH.
set -uo pipefail
OUT=${1:?usage: bash .gpu/run OUT [--sanitize]}
SANITIZE=${2:-}
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEADLINE=${SLAM_GPU_DEADLINE:-540}
# Seconds kept back at the end for packing the logs and printing the summary.
RESERVE=15
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
LOGS="$WORK/logs"
mkdir -p "$LOGS"
# tar needs xz for this; Python's tarfile (PyTorch's Python is there) does without.
tar -C "$WORK" -xJf "$HERE/bin.tar.xz" 2>/dev/null ||
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
        "$HERE/bin.tar.xz" "$WORK" || {
    echo "error: cannot unpack $HERE/bin.tar.xz (run scripts/gpu-check.sh build again)" >&2
    exit 1
}
BIN="$WORK/bin"

seconds_left() { echo $((DEADLINE - SECONDS - RESERVE)); }

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
        path=$(timeout 20 find /usr/local /opt /usr/lib /usr/lib64 -maxdepth 10 \
            \( -type f -o -type l \) -name "$name*" 2>/dev/null | sort | head -n 1)
    fi
    if [[ -z $path ]]; then
        WHERE="NOT FOUND"
        return 1
    fi
    export LD_LIBRARY_PATH="$(dirname "$path")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    WHERE="$path (its folder added to LD_LIBRARY_PATH)"
}

MACHINE="$WORK/machine.txt"
{
    echo "build:   $(head -n 1 "$HERE/BUILD_INFO")"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
            --format=csv,noheader 2>&1 | sed 's/^/card:    /'
    else
        echo "card:    unknown (no nvidia-smi on this machine)"
    fi
    for lib in libcuda libcublas libnvrtc; do
        find_lib "$lib.so"
        echo "$lib: $WHERE"
    done
} >"$MACHINE" 2>&1
{
    cat "$HERE/BUILD_INFO"
    nvidia-smi 2>&1 | head -n 15
    echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
} >"$LOGS/machine.log" 2>&1
cat "$MACHINE"
export SLAM_REQUIRE_GPU=1 RUST_BACKTRACE=1

VERDICTS=()
# The first line that says why a step failed: a test's panic message, a program's `Error:`,
# or the last line of its log.
why_failed() {
    local log=$1 line
    line=$(awk '/panicked at/ { getline; print; exit }' "$log")
    [[ -z $line ]] && line=$(grep -m 1 -E '^(Error|error)[: ]' "$log")
    [[ -z $line ]] && line=$(grep -v '^\s*$' "$log" | tail -n 1)
    echo "${line:0:160}"
}

# step NAME LIMIT MINIMUM CMD...: runs CMD with its output in LOGS/NAME.log, for at most the
# smaller of LIMIT and the time left; skipped when fewer than MINIMUM seconds are left.
step() {
    local name=$1 limit=$2 minimum=$3
    shift 3
    local left verdict
    left=$(seconds_left)
    if ((left < minimum)); then
        verdict="SKIP  (${left} s left, needs ${minimum} s)"
    else
        ((limit > left)) && limit=$left
        local log="$LOGS/$name.log" began=$SECONDS rc
        timeout -k 5 "$limit" "$@" >"$log" 2>&1
        rc=$?
        local took="$((SECONDS - began)) s"
        case $rc in
            0) verdict="PASS  ($took)" ;;
            124 | 137) verdict="TIMEOUT after $limit s" ;;
            *) verdict="FAIL  (exit $rc, $took) $(why_failed "$log")" ;;
        esac
    fi
    VERDICTS+=("$(printf '%-58s %s' "$name" "$verdict")")
    printf '[%3d s] %s\n' "$SECONDS" "${VERDICTS[-1]}"
}

# Every GPU test in its own process: a sticky CUDA fault then fails one test, not every later
# one, and a crash at exit cannot hide a verdict.
for exe in "$BIN"/tests/*; do
    group=$(basename "$exe")
    filter=()
    [[ $group == lib ]] && filter=(engine::cuda)
    mapfile -t names < <("$exe" --list "${filter[@]}" 2>/dev/null | sed -n 's/: test$//p')
    ((${#names[@]})) || VERDICTS+=("$(printf '%-58s %s' "$group" "FAIL  (lists no tests)")")
    for name in "${names[@]}"; do
        step "$group::${name#engine::cuda::}" 120 5 "$exe" --exact "$name" --test-threads=1 --nocapture
    done
done

if [[ $SANITIZE == --sanitize ]]; then
    if command -v compute-sanitizer >/dev/null; then
        step sanitizer-memcheck 240 60 compute-sanitizer --tool memcheck --error-exitcode 99 \
            "$BIN/tests/cuda_ops" --test-threads=1
    else
        VERDICTS+=("$(printf '%-58s %s' sanitizer-memcheck "SKIP  (no compute-sanitizer)")")
    fi
fi

REF=(--crop 224 --batch 256)
BENCHES=(bench-kernels bench-igemm bench-step-tf32 bench-step-bf16 bench-step-exact bench-e2e-tf32)
step bench-kernels 150 40 "$BIN/slam" bench kernels
# The implicit-GEMM convolution under development against the engine's (its check ran as a
# cuda_conv_igemm test).
step bench-igemm 90 20 "$BIN/conv_igemm" --no-check
step bench-step-tf32 100 40 "$BIN/slam" bench step --device cuda --matmul tf32 "${REF[@]}" --warmup 3 --steps 10
step bench-step-bf16 100 40 "$BIN/slam" bench step --device cuda --matmul bf16 "${REF[@]}" --warmup 3 --steps 10
step bench-step-exact 100 40 "$BIN/slam" bench step --device cuda --matmul exact "${REF[@]}" --warmup 1 --steps 3
step bench-e2e-tf32 150 60 "$BIN/slam" bench e2e --device cuda --matmul tf32

# summary.txt: every benchmark's output, then the machine and the verdicts.
{
    for name in "${BENCHES[@]}"; do
        [[ -f $LOGS/$name.log ]] || continue
        echo "== $name"
        grep -v '^\s*$' "$LOGS/$name.log" | tail -n 40
    done
} >"$WORK/numbers.txt"
{
    echo "==== GPU check verdicts ($(date -u +%Y-%m-%dT%H:%M:%SZ), ${SECONDS} s) ===="
    cat "$MACHINE"
    printf '%s\n' "${VERDICTS[@]}"
    pass=$(printf '%s\n' "${VERDICTS[@]}" | grep -c ' PASS ')
    echo "$pass of ${#VERDICTS[@]} steps passed; full logs in logs.tar.gz, numbers in summary.txt"
} >"$WORK/verdicts.txt"
cat "$WORK/numbers.txt" "$WORK/verdicts.txt" >"$OUT/summary.txt"
tar -C "$WORK" -czf "$OUT/logs.tar.gz" logs
echo
# The reply keeps the last 12,000 characters: the verdicts whole, the numbers as far as they fit.
room=$((11000 - $(wc -c <"$WORK/verdicts.txt")))
if (($(wc -c <"$WORK/numbers.txt") > room)); then
    echo "(benchmark outputs cut to fit the reply; all of them are in summary.txt)"
fi
((room > 0)) && head -c "$room" "$WORK/numbers.txt"
cat "$WORK/verdicts.txt"
