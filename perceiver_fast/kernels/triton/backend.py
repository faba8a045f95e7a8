"""The ``"triton"`` attention backend, registered with the dispatcher.

Importing this module registers the backend without importing Triton: it is imported the first time it is asked
about, so a machine without it keeps working and :func:`perceiver_fast.kernels.explain` says why.
"""

from __future__ import annotations

import importlib.util

import torch

from perceiver_fast.kernels.problem import NO_CUDA, AttentionProblem, device_capability
from perceiver_fast.kernels.registry import register_backend
from perceiver_fast.kernels.triton.env import MAX_HEAD_DIM, interpreting

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


_triton_status: dict[str, str | None] = {}


def _triton_missing() -> str | None:
    """Why Triton cannot be used (``None`` when it can); probed once. A plain dict, not ``lru_cache``, so that
    ``torch.compile`` traces dispatch without warnings."""
    if "reason" not in _triton_status:
        reason = None
        if importlib.util.find_spec("triton") is None:
            reason = "triton is not installed (pip install 'perceiver_fast[triton]')"
        else:
            try:
                import triton  # noqa: F401
            except Exception as error:  # a broken install must not break dispatch
                reason = f"triton failed to import: {error}"
        _triton_status["reason"] = reason
    return _triton_status["reason"]


class TritonBackend:
    """Flash-style Triton kernels on CUDA tensors; on CPU tensors in Triton's interpreter when asked for by name."""

    name = "triton"

    def unsupported_reason(self, problem: AttentionProblem) -> str | None:
        # Device first: CPU calls under "auto" (every eager call) get their answer without importing Triton.
        device = problem.device.type
        if device == "cpu":
            if not interpreting():
                return "CPU tensors: Triton runs them only in its interpreter (TRITON_INTERPRET=1)"
            if problem.requested != self.name:
                return "CPU tensors: Triton runs them only in the interpreter; ask with backend='triton'"
        elif device != "cuda":
            return f"{device} tensors are not supported"
        elif interpreting():
            return "TRITON_INTERPRET=1 is set: the kernels would run in the CPU interpreter, not on the GPU"
        missing = _triton_missing()
        if missing is not None:
            return missing
        if problem.dropout_p > 0.0:
            return "dropout_p > 0 is not implemented in the Triton kernels"
        if problem.dtype not in _DTYPES:
            return f"dtype {problem.dtype} is not supported (float32, float16, bfloat16)"
        widest = max(problem.qk_head_dim, problem.v_head_dim)
        if widest > MAX_HEAD_DIM:
            return f"head dim {widest} > {MAX_HEAD_DIM} does not fit the kernels' tiles"
        if device == "cuda":
            capability = device_capability(problem.device)
            if capability is None:
                return NO_CUDA
            if capability < (8, 0):
                return "needs a GPU of compute capability 8.0 or newer"
        return None

    def run(self, q, k, v, *, causal, kv_start, kv_len, scale, return_lse, dropout_p):
        from perceiver_fast.kernels.triton.op import triton_attention

        out, lse = triton_attention(q, k, v, causal=causal, kv_start=kv_start, kv_len=kv_len, scale=scale)
        return out, (lse if return_lse else None)


register_backend(TritonBackend())
