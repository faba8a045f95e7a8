"""Attention kernels behind one op contract; see :mod:`perceiver_fast.kernels.api`.

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

__all__ = ["AttentionProblem", "Dispatch", "attention", "available_backends", "explain", "register_backend"]
