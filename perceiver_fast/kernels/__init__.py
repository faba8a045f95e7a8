"""Attention kernels behind one op contract; see :mod:`perceiver_fast.kernels.api`."""

# Registration order is the auto order (each goes just before eager): CUDA C++ first, then Triton.
from perceiver_fast.kernels import cuda as _cuda_backend  # noqa: F401  registers "cuda"
from perceiver_fast.kernels.api import (
    AttentionProblem,
    Dispatch,
    attention,
    available_backends,
    explain,
    register_backend,
)
from perceiver_fast.kernels.triton import backend as _triton_backend  # noqa: F401  registers "triton"

__all__ = ["AttentionProblem", "Dispatch", "attention", "available_backends", "explain", "register_backend"]
