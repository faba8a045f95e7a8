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

import os
from dataclasses import dataclass, field
from typing import Protocol

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKEND_ENV_VAR = "PERCEIVER_FAST_BACKEND"


@dataclass(frozen=True)
class AttentionProblem:
    """What a backend needs to know to say whether it can run a call (no tensor data)."""

    device: torch.device
    dtype: torch.dtype
    batch: int
    num_queries: int
    num_keys: int
    num_q_heads: int
    num_kv_heads: int
    qk_head_dim: int
    v_head_dim: int
    causal: bool
    has_kv_start: bool
    has_kv_len: bool
    dropout_p: float
    requires_grad: bool
    return_lse: bool
    # "auto", or the backend asked for by name: a backend may accept some calls only when asked for explicitly
    # (Triton runs CPU tensors in its interpreter for tests, never under auto).
    requested: str = "auto"


class AttentionBackend(Protocol):
    """A way to compute the op. ``unsupported_reason`` returns ``None`` when it can run ``problem``."""

    name: str

    def unsupported_reason(self, problem: AttentionProblem) -> str | None: ...

    def run(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool,
        kv_start: torch.Tensor | None,
        kv_len: torch.Tensor | None,
        scale: float,
        return_lse: bool,
        dropout_p: float,
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...


class _EagerBackend:
    name = "eager"

    def unsupported_reason(self, problem: AttentionProblem) -> str | None:
        return None

    def run(self, q, k, v, **kwargs):
        from perceiver_fast.kernels.reference import attention_eager

        return attention_eager(q, k, v, **kwargs)


# Priority order for backend="auto": the first that can run a call wins. Eager is last and runs everything.
_BACKENDS: list[AttentionBackend] = [_EagerBackend()]
# Backends that run only when asked for by name, never under "auto".
_OPT_IN: set[str] = set()


def register_backend(backend: AttentionBackend, *, opt_in: bool = False) -> None:
    """Add a backend ahead of eager in the ``auto`` order (or as opt-in only). Re-registering a name replaces it."""
    _BACKENDS[:] = [b for b in _BACKENDS if b.name != backend.name]
    _BACKENDS.insert(len(_BACKENDS) - 1, backend)
    if opt_in:
        _OPT_IN.add(backend.name)
    else:
        _OPT_IN.discard(backend.name)


def available_backends() -> list[str]:
    """Names of the registered backends, in ``auto`` priority order (opt-in ones included)."""
    return [b.name for b in _BACKENDS]


@dataclass(frozen=True)
class Dispatch:
    """Which backend runs a call and why each other backend was passed over."""

    backend: str
    requested: str
    passed_over: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"backend: {self.backend} (requested: {self.requested})"]
        lines += [f"  {name}: passed over: {why}" for name, why in self.passed_over.items()]
        return "\n".join(lines)


def _requested_backend(backend: str | None) -> str:
    requested = backend if backend is not None else os.environ.get(BACKEND_ENV_VAR, "auto")
    names = {"auto", *available_backends()}
    if requested not in names:
        source = "backend" if backend is not None else BACKEND_ENV_VAR
        raise ValueError(f"{source}={requested!r} is not one of {sorted(names)}")
    return requested


def _decide(problem: AttentionProblem) -> tuple[Dispatch, AttentionBackend]:
    requested = problem.requested
    passed_over: dict[str, str] = {}
    if requested != "auto":
        chosen = next(b for b in _BACKENDS if b.name == requested)
        reason = chosen.unsupported_reason(problem)
        if reason is not None:
            raise RuntimeError(f"attention backend {requested!r} cannot run this call: {reason}")
        return Dispatch(requested, requested, passed_over), chosen
    for candidate in _BACKENDS:
        if candidate.name in _OPT_IN:
            passed_over[candidate.name] = "opt-in only (ask for it with backend=...)"
            continue
        reason = candidate.unsupported_reason(problem)
        if reason is None:
            return Dispatch(candidate.name, requested, passed_over), candidate
        passed_over[candidate.name] = reason
    raise AssertionError("the eager backend accepts every problem")  # pragma: no cover


def _check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must have shape [batch, seq, heads, head_dim], got {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
    return t


def _check_bounds(name: str, t: object, batch: int, device: torch.device) -> torch.Tensor | None:
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
    return t.to(torch.int32)


def _check_problem(q, k, v, causal, kv_start, kv_len, scale, dropout_p, return_lse, backend):
    q, k, v = (_check_tensor(n, t) for n, t in (("q", q), ("k", k), ("v", v)))
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    batch, num_queries, num_q_heads, qk_dim = q.shape
    _, num_keys, num_kv_heads, _ = k.shape
    if k.shape[0] != batch or v.shape[0] != batch:
        raise ValueError(f"batch sizes differ: q {batch}, k {k.shape[0]}, v {v.shape[0]}")
    if v.shape[1] != num_keys or v.shape[2] != num_kv_heads:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree in seq and heads")
    if k.shape[3] != qk_dim:
        raise ValueError(f"q and k head dims differ: {qk_dim} vs {k.shape[3]}")
    if num_queries == 0 or num_keys == 0 or qk_dim == 0 or v.shape[3] == 0 or num_kv_heads == 0:
        raise ValueError(f"empty attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if num_q_heads % num_kv_heads != 0:
        raise ValueError(f"q heads ({num_q_heads}) must be a multiple of k/v heads ({num_kv_heads})")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    kv_start = _check_bounds("kv_start", kv_start, batch, q.device)
    kv_len = _check_bounds("kv_len", kv_len, batch, q.device)
    # Value checks read the tensors (a device sync on GPU); a compiled graph cannot branch on data, so skip there.
    if not torch.compiler.is_compiling():
        if kv_len is not None and (int(kv_len.min()) < 0 or int(kv_len.max()) > num_keys):
            raise ValueError(f"kv_len values must lie in [0, {num_keys}], got {kv_len.tolist()}")
        if kv_start is not None:
            upper = kv_len if kv_len is not None else torch.full_like(kv_start, num_keys)
            if int(kv_start.min()) < 0 or bool((kv_start > upper).any()):
                raise ValueError(f"kv_start values must lie in [0, kv_len], got {kv_start.tolist()}")
    problem = AttentionProblem(
        device=q.device,
        dtype=q.dtype,
        batch=batch,
        num_queries=num_queries,
        num_keys=num_keys,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        qk_head_dim=qk_dim,
        v_head_dim=v.shape[3],
        causal=bool(causal),
        has_kv_start=kv_start is not None,
        has_kv_len=kv_len is not None,
        dropout_p=float(dropout_p),
        requires_grad=torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)),
        return_lse=bool(return_lse),
        requested=_requested_backend(backend),
    )
    return problem, kv_start, kv_len


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
    problem, _, _ = _check_problem(q, k, v, causal, kv_start, kv_len, scale, dropout_p, return_lse, backend)
    return _decide(problem)[0]


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
        return_lse: also return the log-sum-exp of the scaled, masked scores, ``[B, Hq, Nq]`` float32 (``-inf`` for
            rows that see no key). The lse is not differentiable.
        dropout_p: dropout on the attention probabilities (training only; backends without it are passed over).
        backend: ``"auto"`` (default; or the ``PERCEIVER_FAST_BACKEND`` environment variable), or a registered
            backend name (see :func:`available_backends`). A forced backend that cannot run the call raises
            ``RuntimeError`` with the reason; ``auto`` falls back and :func:`explain` says why.

    Returns:
        ``[B, Nq, Hq, Dv]`` in the input dtype (softmax in float32), and the lse when ``return_lse``. A query row
        that sees no key returns zeros, never NaN, in forward and backward.

    Raises:
        TypeError / ValueError naming the argument at fault, before any kernel runs.
    """
    problem, kv_start, kv_len = _check_problem(
        q, k, v, causal, kv_start, kv_len, scale, dropout_p, return_lse, backend
    )
    _, chosen = _decide(problem)
    out, lse = chosen.run(
        q,
        k,
        v,
        causal=problem.causal,
        kv_start=kv_start,
        kv_len=kv_len,
        scale=float(scale) if scale is not None else problem.qk_head_dim**-0.5,
        return_lse=problem.return_lse,
        dropout_p=problem.dropout_p,
    )
    return (out, lse) if return_lse else out
