#!/usr/bin/env bash
# Builds and runs the host emulation of kernels/conv_igemm.cu (see conv_igemm.cpp).
set -euo pipefail
cd "$(dirname "$0")"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
${CXX:-g++} -std=c++17 -O2 -Wall -Wno-unknown-pragmas -o "$TMP/conv_igemm" conv_igemm.cpp
"$TMP/conv_igemm"
