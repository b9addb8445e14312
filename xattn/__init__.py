"""xattn: cross-vendor flash attention.

    out = xattn.attention(q, k, v, causal=True)            # torch, CuPy, NumPy, DLPack arrays
    out, lse = xattn.attention(q, k, v, return_lse=True)
    ref_out, ref_lse = xattn.exact_attention(q, k, v)       # float64 NumPy oracle
    out = xattn.attention(q, k, v, window=(256, 0), softcap=30.0)  # or alibi_slopes=...
    out = xattn.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k)

`import xattn` needs only NumPy; CuPy and torch are imported when their arrays arrive.
"""

from xattn.api import attention, attention_varlen, exact_attention
from xattn.backends import BackendStatus, available_backends
from xattn.kvcache import attention_with_kvcache
from xattn.sources import kernel_files, kernel_source
from xattn.integrations._on_torch_import import install as _register_with_torch

_register_with_torch()  # "xattn" in torch.nn.attention's registry once torch is imported

__version__ = "0.1.0"
__all__ = ["attention", "attention_varlen", "attention_with_kvcache", "exact_attention", "available_backends", "BackendStatus",
           "kernel_source", "kernel_files", "__version__"]
