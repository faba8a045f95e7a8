"""Attention kernels behind one op contract; see :mod:`perceiver_fast.kernels.api`, and the decoding step built on
it (rotary + cache write + attention), :mod:`perceiver_fast.kernels.decode`.

Importing this package loads the backend modules (about 20 ms): a first call traced by ``torch.compile`` could not
import them. None of them imports Triton, the CUDA extension or flash-attn before a call needs it.
"""

from perceiver_fast.kernels.api import (
    AttentionProblem,
    Dispatch,
    attention,
    available_backends,
    explain,
    register_backend,
)
from perceiver_fast.kernels.decode import decode_attention, explain_decode
from perceiver_fast.kernels.registry import load_backends

__all__ = [
    "AttentionProblem",
    "Dispatch",
    "attention",
    "available_backends",
    "decode_attention",
    "explain",
    "explain_decode",
    "register_backend",
]

load_backends()
