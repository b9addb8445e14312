// FP8 KV caches: the two 8-bit formats in plain C, for the decode kernels (kernels_cuda/
// decode_common.h) and for the host C compiler of tests/test_fp8_codec.py, which checks every
// function here against torch's own conversions (all 256 codes of each format, and floats of every
// magnitude through the encoders).
//
//   float8_e4m3fn: s eeee mmm, bias 7, no infinities; 0x7f / 0xff are NaN, the largest finite is
//                  448 (0x7e); subnormals m * 2^-9.
//   float8_e5m2:   s eeeee mm, bias 15, IEEE-like (0x7c inf, 0x7d..0x7f NaN); the largest finite
//                  is 57344 (0x7b); subnormals m * 2^-16.
//
// Encoding is the reference backend's rule (xattn/kvcache.py, quantize): the float32 x / scale is
// saturated to the largest finite value (infinities too), then rounded to nearest, ties to even;
// NaN stays NaN (0x7f with x's sign bit), as torch writes it. Integer arithmetic only, so the
// result does not depend on the compiler's float flags (flush-to-zero, fast math).
//
// Decoding is exact: every value of both formats is a float32 value (and a float16 and bfloat16
// value). The decode kernels use these decoders only where the GPU has no conversion instruction
// (below sm_89: platform.h says which path a target takes).
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FP8_FN __device__ __forceinline__
#else
#define FP8_FN static inline
#endif

#define FP8_E4M3FN 1  // the KV_FP8 values of the decode kernels' -D
#define FP8_E5M2 2

FP8_FN unsigned fp8_float_bits(float f) {
    union { float f; unsigned u; } x;
    x.f = f;
    return x.u;
}

FP8_FN float fp8_bits_float(unsigned u) {
    union { float f; unsigned u; } x;
    x.u = u;
    return x.f;
}

// |x| (float32 bits a, sign cleared, a finite and below the format's smallest normal) in units of
// the format's smallest subnormal 2^-unit_log2, rounded to nearest even. a = 1.f * 2^e: the
// integer significand, 24 bits, times 2^(e - 23 + unit_log2), is shifted right by 23 - unit_log2 - e.
FP8_FN unsigned fp8_round_subnormal(unsigned a, int unit_log2) {
    const int biased = (int)(a >> 23);
    const unsigned significand = biased ? (a & 0x7fffffu) | 0x800000u : (a & 0x7fffffu);
    const int e = biased ? biased - 127 : -126;
    const int shift = 23 - unit_log2 - e;  // >= 21 here: below the smallest normal
    if (shift >= 25) return 0u;            // below half a unit: 0
    const unsigned kept = significand >> shift, rest = significand & ((1u << shift) - 1u);
    const unsigned half = 1u << (shift - 1);
    return kept + (rest > half || (rest == half && (kept & 1u)));
}

// x -> float8_e4m3fn code, saturating, round to nearest even, NaN kept (with its sign).
FP8_FN unsigned char float_to_e4m3fn(float x) {
    const unsigned u = fp8_float_bits(x), sign = (u >> 24) & 0x80u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (unsigned char)(sign | 0x7fu);         // NaN
    if (a >= 0x43e00000u) return (unsigned char)(sign | 0x7eu);        // |x| >= 448: saturate
    if (a < 0x3c800000u) return (unsigned char)(sign | fp8_round_subnormal(a, 9));  // < 2^-6
    // Normal: keep 3 of float32's 23 mantissa bits, rounding the 20 dropped ones to nearest even
    // (a carry moves into the exponent, as it should); rebias the exponent from 127 to 7.
    const unsigned rounded = a + 0x7ffffu + ((a >> 20) & 1u);
    return (unsigned char)(sign | ((rounded >> 20) - (120u << 3)));
}

// x -> float8_e5m2 code, the same rules: 2 mantissa bits, exponent bias 15.
FP8_FN unsigned char float_to_e5m2(float x) {
    const unsigned u = fp8_float_bits(x), sign = (u >> 24) & 0x80u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (unsigned char)(sign | 0x7fu);         // NaN
    if (a >= 0x47600000u) return (unsigned char)(sign | 0x7bu);        // |x| >= 57344: saturate
    if (a < 0x38800000u) return (unsigned char)(sign | fp8_round_subnormal(a, 16));  // < 2^-14
    const unsigned rounded = a + 0xfffffu + ((a >> 21) & 1u);
    return (unsigned char)(sign | ((rounded >> 21) - (112u << 2)));
}

// float8_e4m3fn code -> its value, exactly.
FP8_FN float e4m3fn_to_float(unsigned code) {
    const unsigned sign = (code & 0x80u) << 24, e = (code >> 3) & 0xfu, m = code & 0x7u;
    if (e == 0xfu && m == 0x7u) return fp8_bits_float(sign | 0x7fc00000u);   // NaN
    if (e == 0u) return fp8_bits_float(sign | fp8_float_bits((float)m * 0.001953125f));  // m * 2^-9
    return fp8_bits_float(sign | ((e + 120u) << 23) | (m << 20));
}

// float8_e5m2 code -> its value, exactly (infinities and NaN included).
FP8_FN float e5m2_to_float(unsigned code) {
    const unsigned sign = (code & 0x80u) << 24, e = (code >> 2) & 0x1fu, m = code & 0x3u;
    if (e == 0x1fu) return fp8_bits_float(sign | 0x7f800000u | (m << 21));  // inf, NaN
    if (e == 0u) return fp8_bits_float(sign | fp8_float_bits((float)m * 1.52587890625e-05f));  // m * 2^-16
    return fp8_bits_float(sign | ((e + 112u) << 23) | (m << 21));
}
