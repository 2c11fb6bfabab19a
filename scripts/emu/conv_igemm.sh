#!/usr/bin/env bash
# Builds and runs the host emulation of dev/cuda/conv_igemm.cu (see conv_igemm.cpp).
exec "$(dirname "$0")/emulate.sh" conv_igemm
