"""The attention op of perceiver_fast: one entry point, argument checks and backend dispatch.

Every attention in the Perceiver family (Perceiver AR's prefix cross-attention, latent self-attention, Perceiver IO
cross-attention, decoding over a KV cache) is this one op. Models call :func:`attention` and never name a backend.

Causal alignment is bottom-right. With ``Nq = 3`` queries over ``Nk = 6`` keys (``kv_len = 6``), query ``i`` sits at
key position ``kv_len - Nq + i`` and sees the keys up to and including it::

            keys  0 1 2 3 4 5
    query 0       1 1 1 1 0 0
    query 1       1 1 1 1 1 0
    query 2       1 1 1 1 1 1

With ``kv_start = 2`` (two left pads) the first two columns are masked as well; with ``kv_len = 5`` (a ragged row) the
last key does not exist and every row shifts left by one. A query that sees no key returns zeros (lse ``-inf``).
"""

from __future__ import annotations

import math
import numbers
import os
import sys
from dataclasses import dataclass, field

import torch

from perceiver_fast.kernels import dispatch, registry
from perceiver_fast.kernels.problem import AttentionBackend, AttentionProblem, host_readable
from perceiver_fast.kernels.registry import available_backends, register_backend

__all__ = [
    "BACKEND_ENV_VAR",
    "CHECK_BOUNDS_ENV_VAR",
    "AttentionBackend",
    "AttentionProblem",
    "Dispatch",
    "attention",
    "available_backends",
    "explain",
    "register_backend",
]

# float64 runs on the eager backend only (every other backend passes it over): for gradcheck and float64 references.
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
BACKEND_ENV_VAR = "PERCEIVER_FAST_BACKEND"
CHECK_BOUNDS_ENV_VAR = "PERCEIVER_FAST_CHECK_BOUNDS"


@dataclass(frozen=True)
class Dispatch:
    """Which backend runs a call, what decided it, and why each backend tried before it was passed over."""

    backend: str
    requested: str
    passed_over: dict[str, str] = field(default_factory=dict)
    decided_by: str = ""

    def __str__(self) -> str:
        lines = [f"backend: {self.backend} (requested: {self.requested})"]
        if self.decided_by:
            lines.append(f"  decided by: {self.decided_by}")
        lines += [f"  {name}: passed over: {why}" for name, why in self.passed_over.items()]
        return "\n".join(lines)


def _requested_backend(backend: str | None) -> str:
    requested = backend if backend is not None else os.environ.get(BACKEND_ENV_VAR, "auto")
    if requested == "auto":  # the common case, asked on every call: no need to list the backends
        return requested
    names = {"auto", *available_backends()}
    if requested not in names:
        source = "backend" if backend is not None else BACKEND_ENV_VAR
        raise ValueError(f"{source}={requested!r} is not one of {sorted(names)}")
    return requested


def _decide(problem: AttentionProblem, report: bool = False) -> tuple[Dispatch, AttentionBackend]:
    """The backend to run, and the :class:`Dispatch` record. ``report`` (for :func:`explain`) also asks every backend
    not tried whether it could have run the call; the hot path (:func:`_choose`) does not spend that time."""
    passed_over: dict[str, str] = {}
    name, chosen, decided_by, order = _choose(problem, passed_over)
    if report and order:
        _explain_the_rest(problem, order, name, registry.backends(), passed_over)
    return Dispatch(name, problem.requested, passed_over, decided_by), chosen


def _choose(
    problem: AttentionProblem, passed_over: dict[str, str]
) -> tuple[str, AttentionBackend, str, tuple[str, ...]]:
    """The backend to run: its name, the backend, what decided it and the order ``auto`` tried (empty when ``auto``
    did not decide). The backends tried before it go into ``passed_over`` with the reason."""
    requested = problem.requested
    backends = registry.backends()
    if requested != "auto":  # checked first: a backend asked for by name that cannot run the call is an error
        chosen = backends[requested]
        reason = chosen.unsupported_reason(problem)
        if reason is not None:
            raise RuntimeError(f"attention backend {requested!r} cannot run this call: {reason}")
    if problem.batch == 0:  # nothing to compute: no kernel needs to handle an empty grid
        return "eager", backends["eager"], "batch 0: nothing to compute", ()
    if requested != "auto":
        return requested, chosen, "requested by name", ()
    policy = dispatch.policy_for(problem)
    for name in policy.order:
        candidate = backends.get(name)
        if candidate is None:
            continue
        reason = candidate.unsupported_reason(problem)
        if reason is None:
            return name, candidate, policy.source, policy.order
        passed_over[name] = reason
    raise AssertionError("the eager backend accepts every problem")  # pragma: no cover


_UNRANKED = "can run it, but auto uses it only where a dispatch table measured it fastest (ask with backend=...)"


def _explain_the_rest(
    problem: AttentionProblem,
    order: tuple[str, ...],
    chosen: str,
    backends: dict[str, AttentionBackend],
    passed_over: dict[str, str],
) -> None:
    for name in sorted(backends):
        if name == chosen or name in passed_over:
            continue
        reason = backends[name].unsupported_reason(problem)
        if reason is not None:
            passed_over[name] = reason
        elif name in order:
            passed_over[name] = f"can run it, ranked below {chosen} for this call"
        else:
            passed_over[name] = _UNRANKED


def _check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must have shape [batch, seq, heads, head_dim], got {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: float32, float16, bfloat16, float64")
    return t


def check_flag(name: str, value: object) -> bool:
    """A flag as a plain bool: a bool, an int or NumPy's bool; anything else (a truthy string) is a ``TypeError``."""
    if value is True or value is False:  # the common case, before the type checks
        return value
    numpy = sys.modules.get("numpy")  # NumPy's bool is no numbers.Integral; a flag given as one can only be NumPy's
    if not isinstance(value, (bool, numbers.Integral)) and not (numpy is not None and isinstance(value, numpy.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__qualname__} {value!r}")
    return bool(value)


def _check_real(name: str, value: object, *, optional: bool) -> float | None:
    """A plain float from a Python or NumPy real number (bools and tensors are refused)."""
    if value is None and optional:
        return None
    if type(value) is float:  # the common case: a plain float needs no check of its type
        if torch.compiler.is_compiling() or math.isfinite(value):
            return value
        raise ValueError(f"{name} must be finite, got {value}")
    if isinstance(value, (torch.SymFloat, torch.SymInt)):  # traced by torch.compile: no value to check
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        expected = "a float or None" if optional else "a float"
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")
    if torch.compiler.is_compiling():
        # Inside Dynamo a symbolic float is no torch.SymFloat, and its value cannot be read: its type is checked only.
        return value
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"{name} must be finite, got {result}")
    return result


def _check_bounds_tensor(name: str, t: object, batch: int, device: torch.device) -> torch.Tensor | None:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int32, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an integer tensor (int32), got {t.dtype}")
    if t.shape != (batch,):
        raise ValueError(f"{name} must have shape [batch] = [{batch}], got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")
    return t


def _shown(t: torch.Tensor) -> str:
    values = t.tolist()
    return str(values) if len(values) <= 16 else f"{values[:16]}... ({len(values)} values)"


def _check_bound_values(kv_start: torch.Tensor | None, kv_len: torch.Tensor | None, num_keys: int) -> None:
    """Range checks on the values, as Python ints (before any narrowing to int32 could wrap them). One read of each
    tensor: the op is called per layer and per decoding step, where several reductions would cost more than it."""
    lens = None if kv_len is None else kv_len.tolist()
    if lens and (min(lens) < 0 or max(lens) > num_keys):
        raise ValueError(f"kv_len values must lie in [0, {num_keys}], got {_shown(kv_len)}")
    if kv_start is not None and kv_start.numel():
        starts = kv_start.tolist()
        uppers = lens if lens is not None else [num_keys] * len(starts)
        if any(not 0 <= start <= upper for start, upper in zip(starts, uppers)):
            raise ValueError(
                f"kv_start values must lie in [0, kv_len] (kv_len = Nk = {num_keys} when not given), "
                f"got {_shown(kv_start)}"
            )


def _narrow(t: torch.Tensor | None, num_keys: int) -> torch.Tensor | None:
    """Contiguous int32 bounds for the kernels, which read row ``b``'s bound at offset ``b`` (a stride-0 ``expand``
    or a strided view would hand them other values). Unchecked int64 values saturate rather than wrap: every backend
    clamps bounds into ``[0, Nk]`` anyway, so an out-of-range value reads no memory outside the keys."""
    if t is None:
        return None
    if t.dtype == torch.int32:
        return t.contiguous()
    return t.clamp(0, num_keys).to(torch.int32).contiguous()


def checks_values(t: torch.Tensor) -> bool:
    """Whether the op reads the values of a bounds tensor to check them: on CPU (free), elsewhere only under the
    debug switch ``PERCEIVER_FAST_CHECK_BOUNDS=1`` (a read from a GPU is a device sync on every call)."""
    if host_readable(t):
        return True
    debug = os.environ.get(CHECK_BOUNDS_ENV_VAR, "0") == "1"
    return debug and not torch.compiler.is_compiling() and t.device.type != "meta"


def _check_problem(q, k, v, causal, kv_start, kv_len, scale, dropout_p, return_lse, backend, names=("q", "k", "v")):
    """Check the op's arguments into an :class:`AttentionProblem`. ``names``: what the caller calls q, k and v (the
    decoding step passes its caches as the keys), for the error messages."""
    nq, nk, nv = names
    q, k, v = _check_tensor(nq, q), _check_tensor(nk, k), _check_tensor(nv, v)
    dtype, device = q.dtype, q.device
    if not (dtype == k.dtype == v.dtype):
        raise TypeError(f"{nq}, {nk}, {nv} must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (device == k.device == v.device):
        raise ValueError(f"{nq}, {nk}, {nv} must be on one device, got {q.device}, {k.device}, {v.device}")
    batch, num_queries, num_q_heads, qk_dim = q.shape
    k_batch, num_keys, num_kv_heads, k_dim = k.shape
    v_batch, v_keys, v_heads, v_dim = v.shape
    if k_batch != batch or v_batch != batch:
        raise ValueError(f"batch sizes differ: {nq} {batch}, {nk} {k_batch}, {nv} {v_batch}")
    if v_keys != num_keys or v_heads != num_kv_heads:
        raise ValueError(f"{nk} {tuple(k.shape)} and {nv} {tuple(v.shape)} must agree in seq and heads")
    if k_dim != qk_dim:
        raise ValueError(f"{nq} and {nk} head dims differ: {qk_dim} vs {k_dim}")
    if num_queries == 0 or num_keys == 0 or qk_dim == 0 or v_dim == 0 or num_q_heads == 0 or num_kv_heads == 0:
        raise ValueError(f"empty attention: {nq} {tuple(q.shape)}, {nk} {tuple(k.shape)}, {nv} {tuple(v.shape)}")
    if num_q_heads % num_kv_heads != 0:
        raise ValueError(f"{nq} heads ({num_q_heads}) must be a multiple of {nk}/{nv} heads ({num_kv_heads})")
    causal, return_lse = check_flag("causal", causal), check_flag("return_lse", return_lse)
    scale = _check_real("scale", scale, optional=True)
    dropout_p = _check_real("dropout_p", dropout_p, optional=False)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if kv_start is not None or kv_len is not None:
        kv_start = _check_bounds_tensor("kv_start", kv_start, batch, device)
        kv_len = _check_bounds_tensor("kv_len", kv_len, batch, device)
        # Both are on q's device: the debug switch (an environment read) is asked about once, for either.
        first = kv_start if kv_start is not None else kv_len
        if checks_values(first) or (kv_len is not first and kv_len is not None and host_readable(kv_len)):
            _check_bound_values(kv_start, kv_len, num_keys)
        kv_start, kv_len = _narrow(kv_start, num_keys), _narrow(kv_len, num_keys)
    problem = AttentionProblem(
        device=device,
        dtype=dtype,
        batch=batch,
        num_queries=num_queries,
        num_keys=num_keys,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        qk_head_dim=qk_dim,
        v_head_dim=v_dim,
        causal=causal,
        has_kv_start=kv_start is not None,
        has_kv_len=kv_len is not None,
        dropout_p=dropout_p,
        requires_grad=torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad),
        return_lse=return_lse,
        requested=_requested_backend(backend),
    )
    return problem, kv_start, kv_len, scale


def explain(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    kv_start: torch.Tensor | None = None,
    kv_len: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> Dispatch:
    """Say which backend :func:`attention` would run for these arguments, and why the others were passed over.

    Takes the same arguments as :func:`attention` and runs nothing. ``str(explain(...))`` reads as a short report.
    Raises like :func:`attention` for bad arguments or a forced backend that cannot run the call.
    """
    problem, _, _, _ = _check_problem(q, k, v, causal, kv_start, kv_len, scale, dropout_p, return_lse, backend)
    return _decide(problem, report=True)[0]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    kv_start: torch.Tensor | None = None,
    kv_len: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention in the ``[batch, seq, heads, head_dim]`` layout.

    Args:
        q: ``[B, Nq, Hq, Dqk]`` queries.
        k: ``[B, Nk, Hkv, Dqk]`` keys; ``Hq`` must be a multiple of ``Hkv`` (grouped heads share k/v).
        v: ``[B, Nk, Hkv, Dv]`` values; ``Dv`` may differ from ``Dqk``. Head dims need not be powers of two.
        causal: bottom-right aligned causal masking (see the module docstring): query ``i`` sits at key position
            ``kv_len[b] - Nq + i`` and sees keys up to it. ``Nq == Nk`` is ordinary causal self-attention, ``Nq < Nk``
            is Perceiver AR's prefix cross-attention.
        kv_start: ``[B]`` int32; keys ``j < kv_start[b]`` are masked (left padding). Default 0.
        kv_len: ``[B]`` int32; keys ``j >= kv_len[b]`` do not exist (ragged rows, a preallocated cache). Default Nk.
        scale: multiplies ``q·k``; default ``Dqk ** -0.5``.
        return_lse: also return the log-sum-exp of the scaled, masked scores, ``[B, Hq, Nq]`` float32 (float64 for
            float64 inputs; ``-inf`` for rows that see no key). The lse is not differentiable.
        dropout_p: dropout on the attention probabilities (training only; backends without it are passed over).
        backend: ``"auto"`` (default; or the ``PERCEIVER_FAST_BACKEND`` environment variable), or a registered
            backend name (see :func:`available_backends`). A forced backend that cannot run the call raises
            ``RuntimeError`` with the reason; ``auto`` falls back and :func:`explain` says why.

    Returns:
        ``[B, Nq, Hq, Dv]`` in the input dtype (softmax in float32, in float64 for float64 inputs), and the lse when
        ``return_lse``. A query row that sees no key returns zeros, never NaN, in forward and backward. float64
        inputs run on the eager backend only (every other backend passes them over).

    Raises:
        TypeError / ValueError naming the argument at fault, before any kernel runs.
    """
    problem, kv_start, kv_len, scale = _check_problem(
        q, k, v, causal, kv_start, kv_len, scale, dropout_p, return_lse, backend
    )
    return run_checked(problem, q, k, v, kv_start, kv_len, scale)


def run_checked(
    problem: AttentionProblem,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_start: torch.Tensor | None,
    kv_len: torch.Tensor | None,
    scale: float | None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention` on arguments :func:`_check_problem` already checked (and narrowed) into ``problem``: for
    ops built on this one (the decoding step), which check their arguments once per call, not twice."""
    chosen = _choose(problem, {})[1]
    out, lse = chosen.run(
        q,
        k,
        v,
        causal=problem.causal,
        kv_start=kv_start,
        kv_len=kv_len,
        scale=scale if scale is not None else problem.qk_head_dim**-0.5,
        return_lse=problem.return_lse,
        dropout_p=problem.dropout_p,
    )
    return (out, lse) if problem.return_lse else out
