#!/usr/bin/env bash
# Checks CI can make without a GPU, beside the test suite: every CUDA specialization in
# xattn/configs.py compiles with NVRTC for sm_80, sm_86 and sm_90 (and the decode kernels, FP8
# conversions included, for sm_89), with no register spills.
set -euo pipefail
cd "$(dirname "$0")/.."
pip install --quiet cuda-bindings nvidia-cuda-nvrtc
python ci/compile_kernels.py

# The same for the HIP kernels: every specialization compiles with hiprtc (ROCm 5.2 from Debian)
# for gfx908, gfx90a and gfx1030, without scratch or spills, MFMA on CDNA (ci/hip_compile.py).
# hipcc is installed for its dependencies (ROCm's LLVM tools, which read the code objects).
# clang-19 (Debian) for MI300 (gfx942), RDNA3 (gfx1100) and RDNA4 (gfx1201), with ROCm's device
# libraries linked as hiprtc links them (rocm-device-libs): every row they use, plain and causal in
# every dtype, and the variant flags at D=128 (and at D=256 for the WMMA forward and backward),
# gated like the hiprtc targets
# (ci/results/hip_compile_clang19.log). The full sweep of every flag for every row:
# `python ci/hip_compile.py --arch gfx942 gfx1100 gfx1201 --variants all --jobs 2`.
if command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hipcc libamdhip64-dev rocm-device-libs clang-19 lld-19 >/dev/null
fi
python ci/hip_compile.py --arch gfx908 gfx90a gfx1030 --jobs 2
python ci/hip_compile.py --arch gfx942 gfx1100 gfx1201 --jobs 2
