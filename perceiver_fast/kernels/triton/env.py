"""Settings read from the environment, importable without Triton (the backend asks them on every dispatch)."""

from __future__ import annotations

import os

MAX_HEAD_DIM = 256


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (read at kernel decoration time, so read it the same way)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotuning() -> bool:
    """Whether to tune over a tile list on the GPU (default) or take its first entry."""
    return os.environ.get("PERCEIVER_FAST_TRITON_AUTOTUNE", "1") != "0"
