// The parameter blocks: every attention kernel takes one of these structs by value, and nothing
// else. Python builds them from one NumPy structured dtype per struct (xattn/gpu/params.py), whose
// field offsets tests/test_params.py checks against this file with a C compiler on the CPU. A
// field added here is added there, in the same place.
//
// Plain C on purpose: NVRTC, hiprtc and the host compiler of that test read the same text.
//
// Units: strides count elements of the tensor's own type; a stride of 0 repeats one slice (the
// batch stride of a packed varlen tensor is 0: each sequence indexes from its own first row).
#pragma once

typedef long long i64;

// One tensor seen as (B, H, S, D) with D contiguous, or as (B, H, S) for lse and delta
// (row_stride 1 there).
struct TensorRef {
    void* ptr;
    i64 batch_stride;
    i64 head_stride;
    i64 row_stride;
};

// The attention kernels, forward and backward (FlashAttention-2's Flash_fwd_params and
// Flash_bwd_params in one): a kernel reads the fields of its role and ignores the others.
struct AttnParams {
    // Forward: reads q, k, v; writes o and lse (float32, natural log).
    // Backward: reads q, k, v, o, dout, lse; writes dq, dk, dv, and the scratch delta and dq_accum.
    struct TensorRef q, k, v, o, lse;
    struct TensorRef dout, dq, dk, dv;
    struct TensorRef delta;     // float32 (B, Hq, Sq): rowsum(dout * o)
    struct TensorRef dq_accum;  // float32 (B, Hq, Sq, D), contiguous: dQ summed by atomics

    const int* cu_seqlens_q;   // packed batches (IS_VARLEN): int32 (B + 1,), else null
    const int* cu_seqlens_k;
    const float* alibi_slopes; // HAS_ALIBI: float32 (Hq,) or (B, Hq), else null
    const float* sinks;        // HAS_SINKS (forward): float32 (Hq,) sink logits, else null
    // Paged keys and values (IS_PAGED, forward of a packed batch): k and v are (num_pages,
    // page_size, Hk, D) with k.batch_stride / v.batch_stride the page strides.
    const int* block_table;    // int32 (B, max_pages) page ids, else null
    const int* seqused_k;      // int32 (B,) key counts on the device, or null: cu_seqlens_k's
    i64 alibi_batch_stride;    // 0 for (Hq,) slopes
    i64 block_table_stride;    // elements between two sequences' rows of block_table

    int batch_offset;          // first batch entry of this launch: blockIdx.z + batch_offset
    int heads_q;
    int heads_per_kv;          // GQA group size: query head h reads key/value head h / heads_per_kv
    int seqlen_q;              // packed batches: the longest sequence (the grid covers it)
    int seqlen_k;
    int head_dim;              // the real head dim; HEAD_DIM (compile time) is the padded one
    int window_left;           // the band (attention_common.h): -1 unbounded
    int window_right;
    float softcap_scale;       // scale / c under a softcap c, else unused
    float scale;               // the scale of the values in S: c under a softcap, else the
                               // attention scale
    float scale_log2;          // scale * log2(e): one FFMA turns S into the exp2 argument
    float grad_scale;          // backward: the attention scale, d(scale * x)/dx
    int page_size;             // IS_PAGED: rows per page (a multiple of 16)
    int num_pages;             // IS_PAGED: page ids are clamped to [0, num_pages)
    int max_pages;             // IS_PAGED: the table's width; key counts are clamped to
                               // [0, max_pages * page_size]
    int batch;                 // the sm90 forward's persistent grid (PERSISTENT): the batch
                               // entries its CTAs walk (the others take them from gridDim.z)
};

// KV-cache decoding (kernels_cuda/flash_decode.cu, flash_decode_f32.cu, flash_decode_merge.cu;
// decode_common.h describes the algorithm). Python builds it from xattn/kvcache.py's
// DECODE_PARAMS dtype; tests/test_decode_params.py checks the offsets with a C compiler.
// Caches: contiguous (B, Hk, Smax, D), or paged (block_table non-null): (num_pages, page_size,
// Hk, D), where k.batch_stride and v.batch_stride are the page strides.
struct DecodeParams {
    struct TensorRef q, k, v, o, lse;  // k, v: the caches; lse: (B, Hq, Sq), or ptr null
    struct TensorRef k_new, v_new;     // rows appended to the caches (B, Hk, Snew, D), or null
    float* o_part;                     // split-KV partials: float32 (B, Hq, Sq, splits, HEAD_DIM)
    float* lse_part;                   // and (B, Hq, Sq, splits), base 2; null with one split
    const int* cache_seqlens;          // int32 (B,) on the device, or null: uniform_seqlen
    const int* block_table;            // int32 (B, max_pages) page ids, or null: contiguous caches
    const float* sinks;                // float32 (Hq,) sink logits, or null
    const int* cache_leftpad;          // int32 (B,): sequence b's first cache row, or null: 0
    i64 seqlens_stride;                // elements between two entries of cache_seqlens
    i64 block_table_stride;            // elements between two sequences' rows of block_table
    i64 leftpad_stride;                // elements between two entries of cache_leftpad
    int uniform_seqlen;
    int batch_offset;                  // first batch entry of this launch: blockIdx.z + batch_offset
    int heads_q;
    int heads_per_kv;
    int seqlen_q;
    int seqlen_new;
    int seqlen_max;                    // Smax, the caches' capacity per sequence (paged:
                                       // max_pages * page_size)
    int head_dim;
    int window_left;                   // the band, causal folded in (-1: unbounded)
    int window_right;
    int num_splits;
    int m_blocks;
    int num_pages;                     // paged: page ids are clamped to [0, num_pages)
    int page_size;                     // paged: rows per page (the HIP decode's; the CUDA decode
                                       // has it at compile time, PAGE_SIZE)
    float scale_log2;                  // scale * log2(e)
    float softcap_log2;                // c * log2(e) under a softcap c
    float scale_over_softcap;          // scale / c
    // FP8 caches (KV_FP8): the caches hold x / scale as float8 codes, read as code * scale.
    const float* k_scale;              // float32 scales of K and V, or null (16-bit caches)
    const float* v_scale;
    i64 k_scale_stride;                // elements between two kv heads' scales (0: one per tensor)
    i64 v_scale_stride;
};
