"""One decoding step of attention over a static key/value cache: rotary on the new query and key, the new key and
value written into the cache, and the query attending over the cache, as one op.

Unfused, a step of one layer is several launches (two rotations, two cache writes, the attention and, when the keys
are split for the GPU, their reduction); the ``"cuda"`` backend does it in one launch plus the reduction
(``csrc/attention_decode.cuh``). ``"composite"`` is the same step out of PyTorch ops and :func:`~perceiver_fast.
kernels.api.attention` (which picks its own backend): the reference, and what runs everywhere else. Which of the two
``auto`` runs is measured, like the attention op's backends: the ``decode-step`` rows of the dispatch table; where
no row names ``"cuda"``, the composite step runs (the fused kernel is opt-in until it measures fastest).

Decoding only: no gradients flow through the cache write, and the call asks for no dropout.
"""

from __future__ import annotations

import os

import torch

from perceiver_fast.kernels import api, dispatch
from perceiver_fast.kernels.api import Dispatch
from perceiver_fast.kernels.cache_write import cache_pairs, write_rows
from perceiver_fast.kernels.problem import AttentionProblem
from perceiver_fast.kernels.rotary import rotate_interleaved

DECODE_BACKEND_ENV_VAR = "PERCEIVER_FAST_DECODE_BACKEND"
DECODE_BACKENDS = ("composite", "cuda")


def _requested(backend: str | None) -> str:
    requested = backend if backend is not None else os.environ.get(DECODE_BACKEND_ENV_VAR, "auto")
    if requested not in ("auto", *DECODE_BACKENDS):
        source = "backend" if backend is not None else DECODE_BACKEND_ENV_VAR
        raise ValueError(f"{source}={requested!r} is not one of {['auto', *DECODE_BACKENDS]}")
    return requested


def _check_rotary(
    cos, sin, batch: int, qk_dim: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``cos``/``sin`` as ``[B, 1, 1, R]`` (broadcasting over the heads), or ``None`` without rotary.

    Float32 normally; a model whose buffers were converted (``model.to(torch.bfloat16)``, ``model.double()``) has
    angles in its dtype, and the composite step rotates with them as the model does. Float64 angles come with
    float64 inputs (``dtype``, q's) only: they are what a float64 model has."""
    if cos is None and sin is None:
        return None
    if cos is None or sin is None:
        raise ValueError("cos and sin come together (both None: no rotary)")
    for name, t in (("cos", cos), ("sin", sin)):
        dtype_ok = isinstance(t, torch.Tensor) and t.dtype in api.SUPPORTED_DTYPES
        if not dtype_ok or (t.dtype == torch.float64 and dtype != torch.float64):
            raise TypeError(f"{name} must be a floating-point tensor (float32, float16, bfloat16; float64 with float64 "
                            f"q, k, v), got {getattr(t, 'dtype', type(t).__name__)}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but q is on {device}")
    if cos.dtype != sin.dtype:
        raise TypeError(f"cos and sin must share a dtype, got {cos.dtype} and {sin.dtype}")
    if cos.shape != sin.shape or cos.numel() != batch * cos.shape[-1] or cos.dim() not in (2, 3, 4):
        raise ValueError(f"cos and sin must be [B, R], [B, 1, R] or [B, 1, 1, R] alike, got {tuple(cos.shape)}, "
                         f"{tuple(sin.shape)} for B = {batch}")
    rotate_dim = cos.shape[-1]
    if rotate_dim % 2 or rotate_dim > qk_dim:
        raise ValueError(f"the rotary dim (last dim of cos/sin, {rotate_dim}) must be even and <= the qk head dim "
                         f"({qk_dim})")
    return cos.reshape(batch, 1, 1, rotate_dim), sin.reshape(batch, 1, 1, rotate_dim)


def _check_position(position, batch: int, capacity: int, device: torch.device) -> torch.Tensor | int:
    """An int, or an integer tensor of 1 or ``B`` elements (one cache row per batch row) on q's device."""
    if isinstance(position, bool) or not isinstance(position, (int, torch.Tensor)):
        raise TypeError(f"position must be an int or an integer tensor, got {type(position).__name__}")
    if isinstance(position, int):
        values = [position]
    else:
        if position.dtype not in (torch.int32, torch.int64) or position.numel() not in (1, batch):
            raise ValueError(f"position must be an int32/int64 tensor of 1 or B = {batch} elements, got "
                             f"{position.dtype} {tuple(position.shape)}")
        if position.device != device:
            raise ValueError(f"position is on {position.device} but q is on {device}")
        values = position.reshape(-1).tolist() if api.checks_values(position) else []
    if any(not 0 <= p < capacity for p in values):
        raise ValueError(f"position values must lie in [0, {capacity}) (the cache's capacity), got {values}")
    return position


def _check_step(q, k, v, k_cache, v_cache, position, cos, sin, kv_start, kv_len, scale, return_lse, backend):
    for name, t in (("k", k), ("v", v)):  # the caches are the attention's keys: _check_problem checks them
        api._check_tensor(name, t)
    # The attention part is checked by the op's own checks, on the cache as its keys.
    problem, kv_start, kv_len, scale = api._check_problem(
        q, k_cache, v_cache, False, kv_start, kv_len, scale, 0.0, return_lse, None, names=("q", "k_cache", "v_cache")
    )
    batch, capacity = problem.batch, problem.num_keys
    if problem.num_queries != 1:
        raise ValueError(f"a decoding step has one query per row: q must be [B, 1, Hq, D], got {tuple(q.shape)}")
    expected = {"k": (batch, 1, problem.num_kv_heads, problem.qk_head_dim),
                "v": (batch, 1, problem.num_kv_heads, problem.v_head_dim)}  # fmt: skip
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"{name} must be {list(expected[name])} (the new row, shaped like the cache), got "
                             f"{list(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError("decode_attention writes into the cache and has no backward: call it under torch.no_grad()")
    rotary = _check_rotary(cos, sin, batch, problem.qk_head_dim, q.device, q.dtype)
    position = _check_position(position, batch, capacity, q.device)
    return problem, position, rotary, kv_start, kv_len, scale, _requested(backend)


def _fused_reason(problem: AttentionProblem, rotate_dim: int) -> str | None:
    if problem.device.type != "cuda":
        return f"{problem.device.type.upper()} tensors: the fused kernel runs on CUDA tensors only"
    from perceiver_fast.kernels import cuda  # imported on CUDA only: it loads the compiled library

    return cuda.decode_unsupported_reason(problem, rotate_dim)


def _decide(problem: AttentionProblem, rotate_dim: int, requested: str) -> Dispatch:
    if requested == "composite":
        return Dispatch("composite", requested, {}, "requested by name")
    reason = _fused_reason(problem, rotate_dim)
    if requested == "cuda":
        if reason is not None:
            raise RuntimeError(f"decode backend 'cuda' cannot run this call: {reason}")
        return Dispatch("cuda", requested, {}, "requested by name")
    policy = dispatch.decode_step_policy(problem)
    passed_over = {} if reason is None else {"cuda": reason}
    if reason is None and policy.order and policy.order[0] == "cuda":
        return Dispatch("cuda", requested, {}, policy.source)
    if reason is None:
        passed_over["cuda"] = "can run it, but auto uses it only where a dispatch table measured it fastest"
    return Dispatch("composite", requested, passed_over, policy.source)


def _composite(problem, q, k, v, k_cache, v_cache, position, rotary, kv_start, kv_len, scale):
    if rotary is not None:
        # Query and key heads rotate as one tensor (the same angles per row): half the launches of two rotations.
        num_q_heads = q.shape[2]
        rotated = rotate_interleaved(torch.cat((q, k), dim=2), *rotary)
        q, k = rotated[:, :, :num_q_heads], rotated[:, :, num_q_heads:]
    pairs = cache_pairs(k_cache, v_cache, k, v)  # one copy where keys and values are each one tensor
    if isinstance(position, int):
        for cache, new in pairs:
            cache[:, position : position + 1] = new
    elif position.numel() == 1:
        index = position.reshape(1).to(torch.int64)
        for cache, new in pairs:
            write_rows(cache, index, new)
    else:  # one row per batch row: scatter through the batch dimension
        rows = torch.arange(q.shape[0], device=q.device)
        index = position.reshape(-1).to(torch.int64)
        for cache, new in pairs:
            cache[rows, index] = new[:, 0]
    # The rotated q has q's shape and dtype: the problem checked for the whole step is the attention's.
    return api.run_checked(problem, q, k_cache, v_cache, kv_start, kv_len, scale)


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    position: int | torch.Tensor,
    *,
    kv_start: torch.Tensor | None = None,
    kv_len: torch.Tensor | None = None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Write one new key/value row into a cache and attend the new query over the cache.

    Args:
        q: ``[B, 1, Hq, Dqk]`` the new queries, before rotary.
        k, v: ``[B, 1, Hkv, Dqk]``, ``[B, 1, Hkv, Dv]`` the new keys (before rotary) and values.
        k_cache, v_cache: ``[B, C, Hkv, D]`` the static cache (views are fine: the layers keep it head-major);
            written in place at ``position``.
        position: the cache row of the new key/value, an int or an integer tensor of 1 (all rows) or ``B``
            elements (read on the device, never by the host, so the step can be replayed in a CUDA graph).
        kv_start, kv_len: ``[B]`` int32 bounds of the keys the query sees, after the write (the attention op's
            meaning); usually ``kv_len = position + 1``.
        cos, sin: ``[B, R]`` (or ``[B, 1, R]``, ``[B, 1, 1, R]``), float32 normally: rotary on the first ``R``
            channels of q and k, in interleaved pairs (:func:`~perceiver_fast.kernels.rotary.rotate_interleaved`);
            ``None``: none. The fused kernel rotates in float32 (angles in a 16-bit dtype are widened first, which
            rounds once where the composite step rounds after each product).
        scale: multiplies ``q·k``; default ``Dqk ** -0.5``.
        return_lse: also return the float32 log-sum-exp ``[B, Hq, 1]`` (float64 for float64 inputs, which only the
            composite step runs: the fused kernel passes them over).
        backend: ``"auto"`` (default, or the ``PERCEIVER_FAST_DECODE_BACKEND`` environment variable),
            ``"composite"`` or ``"cuda"`` (the fused kernel; raises ``RuntimeError`` with the reason where it
            cannot run). :func:`explain_decode` says which runs and why.

    Returns:
        ``[B, 1, Hq, Dv]`` (and the lse), as :func:`~perceiver_fast.kernels.api.attention` of the rotated query over
        the cache after the write.

    Raises:
        TypeError / ValueError naming the argument at fault (positions outside the cache are refused where the op
        can read them: on CPU, or under ``PERCEIVER_FAST_CHECK_BOUNDS=1``; the fused kernel never writes outside).
    """
    problem, position, rotary, kv_start, kv_len, scale, requested = _check_step(
        q, k, v, k_cache, v_cache, position, cos, sin, kv_start, kv_len, scale, return_lse, backend
    )
    scale = scale if scale is not None else problem.qk_head_dim**-0.5
    chosen = _decide(problem, 0 if rotary is None else rotary[0].shape[-1], requested)
    if chosen.backend == "composite":
        return _composite(problem, q, k, v, k_cache, v_cache, position, rotary, kv_start, kv_len, scale)
    from perceiver_fast.kernels import cuda

    out, lse = cuda.cuda_decode_attention(
        q, k, v, k_cache, v_cache, position, rotary=rotary, kv_start=kv_start, kv_len=kv_len, scale=scale
    )
    return (out, lse) if return_lse else out


def explain_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    position: int | torch.Tensor,
    *,
    kv_start: torch.Tensor | None = None,
    kv_len: torch.Tensor | None = None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str | None = None,
) -> Dispatch:
    """Which way :func:`decode_attention` would run these arguments (``"composite"`` or ``"cuda"``) and why, without
    running it. Raises like :func:`decode_attention`."""
    problem, _, rotary, _, _, _, requested = _check_step(
        q, k, v, k_cache, v_cache, position, cos, sin, kv_start, kv_len, scale, return_lse, backend
    )
    return _decide(problem, 0 if rotary is None else rotary[0].shape[-1], requested)

