#!/usr/bin/env bash
# The whole GPU suite in one call on a lent NVIDIA machine: kernel checks, the pytest GPU
# properties, compute-sanitizer, compile timing, and the benchmark. Writes logs under $OUT (or
# ci/results/latest) and prints a short summary last.
#
#   bash ci/gpu_suite.sh [kernels] [pytest] [pytest_hip] [pytest_more] [sanitize] [bench] [bench_more] [bench_model]
#   (no argument: all; the device tool's 10-minute limit per command fits one or two per call)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-ci/results/latest}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1
summary=()

step() {  # step NAME TIMEOUT COMMAND...: run, log to $OUT/NAME.log, keep its last line for the summary
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    summary+=("$(printf '%-12s rc=%-3s %4ss  %s' "$name" "$rc" $((SECONDS - start)) "$(grep -v '^\s*$' "$OUT/$name.log" | tail -1 | cut -c1-150)")")
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/gpu.txt"
# Phases, each sized for one 10-minute device call or less:
#   kernels      direct kernel checks (forward, backward, decode; awkward shapes and the variants)
#   pytest       pytest -m gpu: the properties, gradients, variants, KV cache, reliability on the
#                cuda path (and hip, skipped on NVIDIA)
#   pytest_hip   pytest -m gpu: the same property files on the portable HIP kernels on NVIDIA
#                (the backend fixture's hip-on-cuda paths, tests/conftest.py)
#   pytest_more  pytest -m gpu: HIP portable kernel rows, integrations (torch.compile, CUDA
#                graphs, JAX, transformers incl. static caches, precompile), compile timing
#   sanitize     compute-sanitizer over forward and backward (tuned rows, odd sizes, variants),
#                and memcheck on paged/FP8 decode calls with bad block tables (decode_bad_table)
#                and on paged attention_varlen calls with bad tables (varlen_bad_table)
#   bench        forward and backward against SDPA flash and cuDNN
#   bench_more   variants, decode and per-call overhead
#   bench_model  a whole ~1B Llama-style model with xattn and sdpa (bench --model)
#   round_kernels  one short call when device time is scarce: quick kernel checks (forward,
#                backward, decode), per-call overhead, a short forward/backward/decode benchmark
#   round_tests  the GPU tests of the main paths, the hip-on-cuda paths of the main properties,
#                context parallelism when two GPUs are present
#   sanitize_tuned  memcheck, racecheck and synccheck on the tuned rows only
#   verify       kernel checks, the GPU tests (cuda and hip-on-cuda) and sanitize_tuned as
#                parallel jobs in one call
phases=${*:-kernels pytest pytest_hip pytest_more sanitize bench bench_more bench_model}
MORE="tests/test_hip_portable.py tests/test_precompile.py tests/test_integrations_torch.py tests/test_jax.py tests/test_transformers.py"
has() { [[ " $phases " == *" $1 "* ]]; }
if has kernels; then
    step kernels 200 python ci/kernel_check.py --cases grid,variants
    step kernels_bwd 250 python ci/kernel_check_bwd.py --cases grid,variants
    step decode 120 python ci/kernel_check_decode.py
fi
if has pytest; then
    ignore=(); for f in $MORE; do ignore+=(--ignore="$f"); done
    step pytest 560 python -m pytest -m gpu -q -p no:cacheprovider -k "not hip-on-cuda" "${ignore[@]}"
fi
if has pytest_hip; then
    ignore=(); for f in $MORE; do ignore+=(--ignore="$f"); done
    step pytest_hip 560 python -m pytest -m gpu -q -p no:cacheprovider -k "hip-on-cuda" "${ignore[@]}"
fi
if has pytest_more; then
    step pytest_more 480 python -m pytest -m gpu -q -p no:cacheprovider $MORE
    step compile 100 python ci/compile_timing.py
fi
if has sanitize; then
    step sanitize 560 env SANITIZE_TIMEOUT=65 bash ci/sanitize.sh
    # paged decode with out-of-range page ids and lengths, bf16 and FP8 caches
    step sanitize_decode 90 compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 1 python ci/decode_bad_table.py
    # paged attention_varlen with out-of-range page ids and lengths: cuda and hip-on-cuda forwards
    step sanitize_varlen 120 compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 1 python ci/varlen_bad_table.py
fi
if has bench; then
    step bench 280 python -m xattn bench --out "$OUT"
    step bench_bwd 300 python -m xattn bench --bwd --out "$OUT"
fi
if has bench_more; then
    step bench_variants 200 python -m xattn bench --variants --out "$OUT"
    step bench_decode 200 python -m xattn bench --decode --out "$OUT"
    step bench_overhead 150 python -m xattn bench --overhead --out "$OUT"
fi
if has round_kernels; then  # in priority order: a call cut short keeps what ran first
    step kernels 60 python ci/kernel_check.py --quick
    step kernels_bwd 90 python ci/kernel_check_bwd.py --quick
    step decode 40 python ci/kernel_check_decode.py --quick
    step bench_overhead 60 python -m xattn bench --overhead --out "$OUT"
    step bench 70 python -m xattn bench --dtypes bfloat16 --head-dims 64 128 256 \
        --seqlens 2048 8192 --out "$OUT"
    step bench_bwd 70 python -m xattn bench --bwd --dtypes bfloat16 --head-dims 64 128 256 \
        --seqlens 4096 --out "$OUT"
    step bench_decode 60 python -m xattn bench --decode --out "$OUT"
fi
if has round_tests; then
    step pytest 240 python -m pytest -m gpu -q -p no:cacheprovider --maxfail=10 -k "not hip-on-cuda" \
        tests/test_properties.py tests/test_grad.py tests/test_torch_ops.py tests/test_variants.py \
        tests/test_attention_sinks.py tests/test_kvcache.py tests/test_kvcache_fp8.py \
        tests/test_sm90.py tests/test_torch_sdpa.py tests/test_flash_attn_compat.py \
        tests/test_concurrency.py tests/test_transformers.py
    step pytest_hip 120 python -m pytest -m gpu -q -p no:cacheprovider --maxfail=10 -k "hip-on-cuda" \
        tests/test_properties.py tests/test_grad.py tests/test_kvcache.py tests/test_hip_decode.py
    if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then  # NVLink multicast stays off (device rules)
        step cp_test 90 env NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
            torchrun --nproc-per-node 2 ci/cp_test.py
    fi
fi
if has verify; then  # everything that checks, nothing that times: parallel jobs on one GPU
    # (the work is launch- and compile-bound, so the jobs share the GPU with little contention)
    pstep() { (step "$@"; printf '%s\n' "${summary[-1]}" > "$OUT/$1.sum") & }
    gpu="python -m pytest -m gpu -q -p no:cacheprovider --maxfail=20"
    export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX would take 75% of the GPU from the others
    limit=${VERIFY_LIMIT:-420}
    pstep kernels "$limit" python ci/kernel_check.py --quick
    pstep kernels_bwd "$limit" python ci/kernel_check_bwd.py --quick
    pstep decode "$limit" python ci/kernel_check_decode.py --quick
    pstep pytest_a "$limit" $gpu -k "not hip-on-cuda" tests/test_properties.py
    pstep pytest_b "$limit" $gpu -k "not hip-on-cuda" tests/test_grad.py tests/test_variants_grad.py
    pstep pytest_c "$limit" $gpu -k "not hip-on-cuda" tests/test_torch_ops.py tests/test_variants.py \
        tests/test_attention_sinks.py tests/test_sinks.py tests/test_gpu.py tests/test_numerics.py
    pstep pytest_d "$limit" $gpu -k "not hip-on-cuda" tests/test_kvcache.py
    pstep pytest_e "$limit" $gpu -k "not hip-on-cuda" tests/test_kvcache_fp8.py \
        tests/test_decode_fp8_fragments.py tests/test_cache_faults.py
    pstep pytest_h "$limit" $gpu -k "not hip-on-cuda" tests/test_sm90.py tests/test_varlen_paged.py
    pstep pytest_f "$limit" $gpu -k "not hip-on-cuda" tests/test_torch_sdpa.py \
        tests/test_flash_attn_compat.py tests/test_concurrency.py tests/test_transformers.py
    pstep pytest_g "$limit" $gpu -k "not hip-on-cuda" tests/test_integrations_torch.py tests/test_jax.py \
        tests/test_precompile.py tests/test_api.py tests/test_gpu_adapter.py tests/test_params.py \
        tests/test_fuzz.py tests/test_huge.py tests/test_cli.py tests/test_kernels.py tests/test_launch.py
    pstep pytest_hip "$limit" $gpu -k "hip-on-cuda" tests/test_properties.py tests/test_grad.py \
        tests/test_kvcache.py tests/test_hip_decode.py tests/test_hip_portable.py tests/test_varlen_paged.py
    pstep sanitize "$limit" env SANITIZE_TIMEOUT=60 SANITIZE_TIMEOUT_RACECHECK_BWD=200 \
        SANITIZE_TOOLS="memcheck racecheck synccheck" SANITIZE_CASES=tuned bash ci/sanitize.sh
    pstep sanitize_tables "$limit" bash -c "compute-sanitizer --tool memcheck --report-api-errors no \
        --error-exitcode 1 python ci/decode_bad_table.py && compute-sanitizer --tool memcheck \
        --report-api-errors no --error-exitcode 1 python ci/varlen_bad_table.py"
    wait
    for f in "$OUT"/*.sum; do summary+=("$(cat "$f")"); done
fi
if has sanitize_tuned; then  # the tuned rows only, three tools: one short call
    step sanitize 200 env SANITIZE_TIMEOUT=30 SANITIZE_TOOLS="memcheck racecheck synccheck" \
        SANITIZE_CASES=tuned bash ci/sanitize.sh
fi
if has bench_model; then
    step bench_model 560 python -m xattn bench --model --out "$OUT"
fi

echo "== GPU suite on $(cat "$OUT/gpu.txt") =="
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
