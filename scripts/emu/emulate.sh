#!/usr/bin/env bash
# Builds and runs host emulations of kernels/*.cu: `emulate.sh NAME...` compiles NAME.cpp
# (a driver that includes cuda_shim.h and the kernel file) and runs it; with no NAME, every
# driver in this folder. Exits nonzero when any build or run fails.
set -euo pipefail
cd "$(dirname "$0")"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
    for f in *.cpp; do names+=("${f%.cpp}"); done
fi
for n in "${names[@]}"; do
    echo "== $n"
    ${CXX:-g++} -std=c++17 -O2 -ffp-contract=off -Wall -Wno-unknown-pragmas -o "$TMP/$n" "$n.cpp"
    "$TMP/$n"
done
