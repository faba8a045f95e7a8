"""Attention kernels behind one op contract; see :mod:`perceiver_fast.kernels.api`."""

from perceiver_fast.kernels.api import (
    AttentionProblem,
    Dispatch,
    attention,
    available_backends,
    explain,
    register_backend,
)

__all__ = ["AttentionProblem", "Dispatch", "attention", "available_backends", "explain", "register_backend"]
