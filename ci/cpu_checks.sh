#!/usr/bin/env bash
# Checks CI can make without a GPU, beside the test suite: every CUDA specialization in
# xattn/configs.py compiles with NVRTC for sm_80, sm_86 and sm_90, with no register spills.
set -euo pipefail
cd "$(dirname "$0")/.."
pip install --quiet cuda-bindings nvidia-cuda-nvrtc
python ci/compile_kernels.py

# The same for the HIP kernels: every specialization compiles with hiprtc (ROCm 5.2 from Debian)
# for gfx908, gfx90a and gfx1030, and with Debian's clang-19 for gfx942 (MI300), gfx1100 (RDNA3) and
# gfx1201 (RDNA4), without scratch or spills, MFMA on CDNA, WMMA on RDNA3/RDNA4 (ci/hip_compile.py).
# hipcc is installed for its dependencies (ROCm's LLVM tools, which read the code objects, and the
# HIP headers clang-19 compiles against). Two compile jobs: CI machines have two cores.
if command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hipcc libamdhip64-dev \
        rocm-device-libs clang-19 lld-19 >/dev/null
fi
python ci/hip_compile.py --jobs 2
