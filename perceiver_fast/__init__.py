"""perceiver_fast: Perceiver, Perceiver IO and Perceiver AR on fused attention kernels."""

from perceiver_fast.kernels import attention, available_backends, explain

__version__ = "0.1.0"

__all__ = ["__version__", "attention", "available_backends", "explain"]
