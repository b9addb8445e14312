"""xattn: cross-vendor flash attention.

    out = xattn.attention(q, k, v, causal=True)            # torch, CuPy, NumPy, DLPack arrays
    out, lse = xattn.attention(q, k, v, return_lse=True)
    ref_out, ref_lse = xattn.exact_attention(q, k, v)       # float64 NumPy oracle

`import xattn` needs only NumPy; CuPy and torch are imported when their arrays arrive.
"""

from xattn.api import attention, exact_attention
from xattn.backends import BackendStatus, available_backends
from xattn.sources import kernel_files, kernel_source

__version__ = "0.1.0"
__all__ = ["attention", "exact_attention", "available_backends", "BackendStatus",
           "kernel_source", "kernel_files", "__version__"]
