#!/usr/bin/env bash
# Checks CI can make without a GPU, beside the test suite: every CUDA specialization in
# xattn/configs.py compiles with NVRTC for sm_80, sm_86 and sm_90, with no register spills.
set -euo pipefail
cd "$(dirname "$0")/.."
pip install --quiet cuda-bindings nvidia-cuda-nvrtc
python ci/compile_kernels.py
