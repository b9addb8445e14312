// The per-element softmax backward of both vendors' backward kernels without tensor-core
// fragments of their own: the HIP MFMA/WMMA ones (kernels_hip/flash_bwd_mfma_dkdv.hip,
// flash_bwd_mfma_dq.hip) and the body without matrix instructions, flash_bwd_simt.h (CUDA's
// float32 backward and AMD's portable one).
//
// With S = scale Q K^T (plus the score modifiers of attention_common.h), P = softmax(S) recomputed
// from the forward's natural-log LSE (turned into base 2 on loading, backward_lse2 in
// attention_common.h, so that P = exp2(s * scale_log2 - lse2) is one FMA and one exp2),
// dP = dO V^T and delta = rowsum(dO * O) (the backward's preprocess):
//   dS = P * (dP - delta),   dV = P^T dO,   dK = grad_scale dS^T Q,   dQ = grad_scale dS K,
// and under a softcap dS also takes the factor 1 - t^2 (softcap_grad), t being the capped value
// the kernel holds. Rows past the end and rows that saw no key have lse2 = +inf, so
// P = exp2(s - inf) = 0 and dS = 0 * (finite) = 0: they add nothing, with no mask and no NaN.
#pragma once

// Needs the vendor's platform.h (fast_exp2) and attention_common.h (ScoreMods) included first.

// P and dS of one (query, key) pair from its raw dot product x = q.k (unscaled) and dp = dO.v.
// check_mask: the pair may lie outside the band (the tile crosses an edge of it). Hidden pairs get
// P = 0 outright rather than through s = -inf, which would give NaN if scale were 0 and, under a
// softcap, 0 * inf in the factor 1 - t^2.
__device__ __forceinline__ float2 softmax_backward(float x, float dp, int query, int key,
                                                   const ScoreMods& mods, bool check_mask,
                                                   float lse2, float delta, float scale_log2) {
    const float s = modified_score(x, query, key, mods, false);
    const bool visible = !check_mask || key_visible(query, key, mods.band, mods.seqlen_k);
    const float p = visible ? fast_exp2(fmaf(s, scale_log2, -lse2)) : 0.f;
    const float ds = p * (dp - delta);
    return make_float2(p, HAS_SOFTCAP ? ds * softcap_grad(s) : ds);
}
