"""Attention kernels behind one op contract; see :mod:`perceiver_fast.kernels.api`, and the decoding step built on
it (rotary + cache write + attention), :mod:`perceiver_fast.kernels.decode`.

Importing this package imports no backend: the registry loads them the first time a call is dispatched (or
:func:`available_backends` is asked), so Triton, the CUDA extension and flash-attn are imported only where used.
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
