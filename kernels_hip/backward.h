// The per-element softmax backward shared by the HIP backward kernels (flash_bwd_mfma_dkdv.hip,
// flash_bwd_mfma_dq.hip, flash_bwd_portable.hip); the same math as kernels_cuda/flash_bwd_simt.cu.
//
// With S = scale Q K^T, P = softmax(S) recomputed from the forward's natural-log LSE (turned into
// base 2 on loading, backward_lse2 in attention_common.h, so that P = exp2(x * scale_log2 - lse2)
// is one FMA and one v_exp_f32), dP = dO V^T and delta = rowsum(dO * O) (flash_bwd_prep.hip):
//   dS = P * (dP - delta),   dV = P^T dO,   dK = scale dS^T Q,   dQ = scale dS K.
// Rows past the end and rows that saw no key have lse2 = +inf, so P = exp2(x - inf) = 0 and
// dS = 0 * (finite) = 0: they add nothing, with no mask and no NaN.
#pragma once

// Needs platform.h (fast_exp2) and ../kernels_cuda/attention_common.h (Band) included first.

// P and dS of one (query, key) pair from its raw score x = q.k (unscaled) and dp = dO.v. Hidden
// pairs get P = 0 outright rather than through x = -inf, which would give NaN if scale were 0.
__device__ __forceinline__ float2 softmax_backward(float x, float dp, bool visible, float lse2,
                                                   float delta, float scale_log2) {
    const float p = visible ? fast_exp2(fmaf(x, scale_log2, -lse2)) : 0.f;
    return make_float2(p, p * (dp - delta));
}

// The band of keys each query sees (attention_common.h) for the causal flag, the only mask the HIP
// kernels take so far: query i sees key j iff j <= i + (Sk - Sq) when IS_CAUSAL.
__device__ __forceinline__ Band causal_band(int seqlen_q, int seqlen_k) {
    return make_band(seqlen_q, seqlen_k, -1, IS_CAUSAL ? 0 : -1);
}
