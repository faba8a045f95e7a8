"""Tri Dao's flash-attn package as backends, when it is installed: ``flash-attn`` (2.x, ``flash_attn_func``) and
``flash-attn-cute`` (``flash_attn.cute``, FlashAttention-4 for Hopper and Blackwell).

Both read the contract's ``[B, N, H, D]`` layout and grouped heads natively and align causal masks bottom-right
(flash-attn 2.1 and later). Neither takes per-row key bounds through this interface (that is flash-attn's varlen
API, which packs rows), so calls with ``kv_start``/``kv_len`` pass them over. Nothing here imports flash-attn
until a call asks about it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

import torch

from perceiver_fast.kernels.problem import NO_CUDA, AttentionProblem, device_capability
from perceiver_fast.kernels.registry import register_backend

_HALF = (torch.float16, torch.bfloat16)


# What is installed does not change within a process, and asking costs file-system reads (importlib.metadata took
# 0.2 ms a call on an H200 host, twice for every op call that reached this backend): each is looked up once. Plain
# dicts, not functools.cache, so that torch.compile traces dispatch without warnings (as Triton's probe).
_versions: dict[str, tuple[int, ...] | None] = {}
_found: dict[str, bool] = {}


def _installed_version(distribution: str) -> tuple[int, ...] | None:
    if distribution not in _versions:
        try:
            text = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            _versions[distribution] = None
        else:
            _versions[distribution] = tuple(int(part) for part in text.split("+")[0].split(".")[:2] if part.isdigit())
    return _versions[distribution]


def _module_found(name: str) -> bool:
    if name not in _found:
        try:
            _found[name] = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a submodule's parent package is missing
            _found[name] = False
    return _found[name]


def _common_reason(problem: AttentionProblem, max_head_dim: int) -> str | None:
    if problem.device.type != "cuda":
        return "flash-attn runs on CUDA tensors only"
    if problem.dtype not in _HALF:
        return f"flash-attn takes float16 or bfloat16, got {problem.dtype}"
    if problem.has_bounds:
        return "kv_start/kv_len need flash-attn's varlen interface, which this backend does not use"
    if problem.causal and problem.num_queries > problem.num_keys:
        return "causal with more queries than keys: rows that see no key are not defined as zero"
    if problem.qk_head_dim != problem.v_head_dim or problem.qk_head_dim > max_head_dim:
        return f"flash-attn needs equal q/k and v head dims of at most {max_head_dim}"
    capability = device_capability(problem.device)
    if capability is None:
        return NO_CUDA
    if capability < (8, 0):
        return "flash-attn needs compute capability 8.0 or newer"
    return None


class FlashAttn2Backend:
    """``flash_attn.flash_attn_func`` (flash-attn 2.1 or later)."""

    name = "flash-attn"

    def unsupported_reason(self, problem: AttentionProblem) -> str | None:
        version = _installed_version("flash-attn") or _installed_version("flash_attn")
        if version is None or not _module_found("flash_attn"):
            return "flash-attn is not installed"
        if version < (2, 1):
            return f"flash-attn {'.'.join(map(str, version))} aligns causal masks top-left; 2.1 or later needed"
        return _common_reason(problem, 256)

    def run(self, q, k, v, *, causal, kv_start, kv_len, scale, return_lse, dropout_p):
        from flash_attn import flash_attn_func

        result = flash_attn_func(q, k, v, dropout_p, softmax_scale=scale, causal=causal, return_attn_probs=return_lse)
        if return_lse:
            out, lse, _ = result
            return out, lse  # softmax_lse is [B, H, Nq] float32, as the contract's lse
        return result, None


class FlashAttnCuteBackend:
    """``flash_attn.cute.flash_attn_func`` (FlashAttention-4): forward and backward, no dropout, no lse here."""

    name = "flash-attn-cute"

    def unsupported_reason(self, problem: AttentionProblem) -> str | None:
        if not _module_found("flash_attn.cute"):
            return "flash_attn.cute (FlashAttention-4) is not installed"
        if problem.dropout_p > 0.0:
            return "dropout_p > 0: flash_attn.cute has no dropout"
        if problem.return_lse:
            return "return_lse: not taken from flash_attn.cute (its lse layout varies between releases)"
        reason = _common_reason(problem, 128)
        if reason is None and device_capability(problem.device) < (9, 0):
            return "flash_attn.cute targets compute capability 9.0 and newer"
        return reason

    def run(self, q, k, v, *, causal, kv_start, kv_len, scale, return_lse, dropout_p):
        from flash_attn.cute import flash_attn_func

        result = flash_attn_func(q, k, v, softmax_scale=scale, causal=causal)
        return (result[0] if isinstance(result, tuple) else result), None


register_backend(FlashAttn2Backend())
register_backend(FlashAttnCuteBackend())
