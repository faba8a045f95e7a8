"""Eager PyTorch implementation of the attention op contract (see :mod:`perceiver_fast.kernels.api`): the ``"eager"``
backend.

It is the CPU path, the fallback of every other backend, and what the kernels are checked against. The output goes
through ``F.scaled_dot_product_attention``, which is exact for every case of the contract once rows that see no key
are taken care of (they are given a visible key, computed and zeroed, so no NaN reaches forward or backward).
Calls without key bounds skip the mask entirely (SDPA's own causal flag, or none for a single query; prefix-causal
calls that need no gradient run as two unmasked parts, see :func:`_prefix_causal_in_two_parts`). Calls that
ask for the log-sum-exp take SDPA's CPU flash kernel (which returns it) on CPU, and one dense float32 pass elsewhere
or where that kernel cannot run (dropout, unequal head dims or head counts, float64).

float64 inputs (which only this backend runs) are computed in float64 throughout, their lse included: every path
either runs SDPA in the input dtype or takes the dense pass in float64, never rounding through float32.

Keys a query does not see never reach its result, whatever they hold (NaN, inf, the garbage of ``torch.empty``):
SDPA multiplies the whole probability matrix with the values, and ``0 * NaN`` is NaN. Keys outside a row's
``[kv_start, kv_len)`` are therefore cut off (on CPU, where the bounds can be read for free) or zeroed. Keys inside the
bounds that the causal mask hides from earlier rows are real keys; on CPU they are checked, and only when one is not
finite does the call take a dense pass that keeps it out of the rows that do not see it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from perceiver_fast.kernels.partial import merge_partial_attention
from perceiver_fast.kernels.problem import AttentionProblem, host_readable
from perceiver_fast.kernels.registry import register_backend


def key_ranges(
    batch: int,
    num_queries: int,
    num_keys: int,
    *,
    causal: bool,
    kv_start: torch.Tensor | None,
    kv_len: torch.Tensor | None,
    device: torch.device,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The keys each query row sees, ``[first, end)``: int32 ``[B, Nq]`` tensors, or ``[1, Nq]`` when there are no
    key bounds (every batch row sees the same keys, so one mask serves the whole batch). ``first`` is None when it is
    0 for every row. A row sees no key where ``end <= first``."""
    rows = batch if kv_start is not None or kv_len is not None else 1
    int32 = torch.int32
    if kv_len is not None:
        length = kv_len.view(batch, 1).to(int32)
    else:
        length = torch.full((1, 1), num_keys, dtype=int32, device=device)
    end = length
    if causal:  # bottom-right: query i sits at position length - Nq + i
        end = torch.minimum(length, length - num_queries + 1 + torch.arange(num_queries, device=device, dtype=int32))
    first = None if kv_start is None else kv_start.view(batch, 1).to(int32).expand(rows, num_queries)
    return first, end.expand(rows, num_queries)


def range_mask(first: torch.Tensor | None, end: torch.Tensor, num_keys: int) -> torch.Tensor:
    """``[R, Nq, Nk]`` bool, True where key ``j`` is in ``[first, end)`` of its row (see :func:`key_ranges`)."""
    # int32 comparisons: a third faster than int64 on CPU, where this mask costs as much as a tenth of the call.
    keys = torch.arange(num_keys, device=end.device, dtype=torch.int32)
    below_end = keys < end.unsqueeze(-1)
    return below_end if first is None else below_end & (keys >= first.unsqueeze(-1))


def _all_finite(*tensors: torch.Tensor) -> bool:
    """Whether every value is finite. One sum per tensor (NaN and inf propagate into it) is a single pass with no
    temporary; a sum that overflows to inf only sends the call down the slower, still exact, path."""
    return all(bool(torch.isfinite(t.sum(dtype=torch.float32))) for t in tensors if t.numel())


def _keys_within_bounds(
    k: torch.Tensor, v: torch.Tensor, kv_start: torch.Tensor | None, kv_len: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``k, v`` and bounds such that no key outside a row's bounds can reach the result.

    On CPU the keys outside every row's bounds are sliced off (free: a preallocated cache is read only up to its
    longest row), bounds that bound nothing any more are dropped (no mask to build), and the keys still outside some
    row's bounds are zeroed only if one of them is not finite. Elsewhere the values cannot be read without a device
    sync, and the keys outside the bounds are zeroed. Bounds are first clamped into ``[0, Nk]`` (what the contract
    gives unchecked values).
    """
    num_keys = k.shape[1]
    bounds = kv_start if kv_start is not None else kv_len
    if host_readable(bounds) and bounds.numel():
        return _keys_within_host_bounds(k, v, kv_start, kv_len)
    # Out-of-range values are refused by the op where it can read them; where it cannot they mean the clamped ones.
    if kv_len is not None:
        kv_len = kv_len.clamp(0, num_keys)
    if kv_start is not None:
        kv_start = kv_start.clamp(0, num_keys)
        kv_start = torch.minimum(kv_start, kv_len) if kv_len is not None else kv_start
    return _zero_keys_outside(k, v, kv_start, kv_len)


def _keys_within_host_bounds(
    k: torch.Tensor, v: torch.Tensor, kv_start: torch.Tensor | None, kv_len: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The CPU case of :func:`_keys_within_bounds`: the bounds are read once, and the rest is decided in Python
    (decoding calls this for every layer of every step, where a handful of tiny tensor ops would cost more than the
    attention itself)."""
    batch, num_keys = k.shape[:2]
    lens = [num_keys] * batch if kv_len is None else [min(max(n, 0), num_keys) for n in kv_len.tolist()]
    starts = [0] * batch if kv_start is None else [min(max(s, 0), n) for s, n in zip(kv_start.tolist(), lens)]
    lo, hi = min(starts), max(lens)
    if hi > lo and (lo > 0 or hi < num_keys):
        k, v, num_keys = k[:, lo:hi], v[:, lo:hi], hi - lo
        starts, lens = [s - lo for s in starts], [n - lo for n in lens]
    below, above = max(starts), min(lens)
    if below == 0 and above == num_keys:  # every row sees every remaining key: no bounds, no mask
        return k, v, None, None
    device = k.device
    kv_start = torch.tensor(starts, dtype=torch.int32, device=device) if below > 0 else None
    kv_len = torch.tensor(lens, dtype=torch.int32, device=device) if above < num_keys else None
    if _all_finite(k[:, :below], v[:, :below], k[:, above:], v[:, above:]):
        return k, v, kv_start, kv_len
    return _zero_keys_outside(k, v, kv_start, kv_len)


def _zero_keys_outside(
    k: torch.Tensor, v: torch.Tensor, kv_start: torch.Tensor | None, kv_len: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    num_keys = k.shape[1]
    keys = torch.arange(num_keys, device=k.device)
    outside = torch.zeros(k.shape[0], num_keys, dtype=torch.bool, device=k.device)
    if kv_start is not None:
        outside = outside | (keys < kv_start.unsqueeze(1))
    if kv_len is not None:
        outside = outside | (keys >= kv_len.unsqueeze(1))
    outside = outside.view(*outside.shape, 1, 1)
    return k.masked_fill(outside, 0), v.masked_fill(outside, 0), kv_start, kv_len


def _hidden_keys_not_finite(k: torch.Tensor, v: torch.Tensor, kv_len: torch.Tensor | None, num_queries: int) -> bool:
    """On CPU: whether a key that the causal mask hides from some row holds a non-finite value. Those are the last
    ``Nq - 1`` keys of each row."""
    if num_queries < 2 or not host_readable(k) or k.numel() == 0:  # the query count first: decoding asks per step
        return False
    shortest = int(kv_len.min()) if kv_len is not None else k.shape[1]
    first = max(shortest - num_queries + 1, 0)
    return not _all_finite(k[:, first:], v[:, first:])


def attention_eager(
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The op on already validated arguments; returns ``(out, lse or None)``."""
    if kv_start is not None or kv_len is not None:
        k, v, kv_start, kv_len = _keys_within_bounds(k, v, kv_start, kv_len)
    batch, num_queries, num_keys = q.shape[0], q.shape[1], k.shape[1]
    guard = causal and _hidden_keys_not_finite(k, v, kv_len, num_queries)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # views: SDPA wants [B, H, N, D]
    # SDPA's CPU flash kernel gives NaN under its own causal flag when scale <= 0 (it scales the masked -inf):
    # such calls take a mask.
    causal_flag = bool(scale > 0)
    # Without bounds, causal masking is SDPA's own (top-left equals bottom-right when Nq == Nk) or void (one query
    # at the last position sees every key): no mask to build, and no row can be empty.
    no_bounds = kv_start is None and kv_len is None
    unmasked = no_bounds and (not causal or num_queries == 1 or (num_queries == num_keys and causal_flag))
    prefix_causal = causal and no_bounds and 1 < num_queries < num_keys and causal_flag
    # Not under autocast, which casts SDPA's inputs but not those of the aten kernel the two parts call.
    two_parts = prefix_causal and not guard and not _needs_grad(q, k, v)
    if two_parts and not torch.is_autocast_enabled(q.device.type) and _flash_returns_lse(qt, kt, vt, dropout_p):
        out, lse = _prefix_causal_in_two_parts(qt, kt, vt, scale)
        return out, (lse if return_lse else None)
    if unmasked and not guard and not return_lse:
        # A branch, not is_causal=(causal and Nq > 1): under torch.compile with dynamic shapes that is a SymBool,
        # which SDPA refuses, while a branch on it is a guard.
        if causal and num_queries > 1:
            out = _sdpa(qt, kt, vt, dropout_p=dropout_p, scale=scale, is_causal=True)
        else:
            out = _sdpa(qt, kt, vt, dropout_p=dropout_p, scale=scale)
        return out.transpose(1, 2), None
    # Without key bounds every row sees a key (a causal one its own position at least), unless there are more
    # causal queries than keys, or no keys.
    every_row_sees = no_bounds and num_keys > 0 and (not causal or num_queries <= num_keys)
    flash_lse = return_lse and not guard and _flash_returns_lse(qt, kt, vt, dropout_p)
    if flash_lse and unmasked and every_row_sees:
        # No mask and no empty row: no key ranges to build (a third of a decoding call's time on the CPU).
        return _cpu_flash_attention_with_lse(qt, kt, vt, None, None, causal, scale)
    first, end = key_ranges(
        batch, num_queries, num_keys, causal=causal, kv_start=kv_start, kv_len=kv_len, device=q.device
    )
    sees = None if every_row_sees else end > (0 if first is None else first)  # [R, Nq]
    if flash_lse:
        # SDPA's CPU flash kernel returns the log-sum-exp too; a dense float32 pass costs several times as much
        # (7x at 256 queries over 8k keys) and holds the whole score matrix.
        visible = None if unmasked else range_mask(first, end, num_keys)
        return _cpu_flash_attention_with_lse(qt, kt, vt, visible, sees, causal, scale)
    if return_lse or guard:
        visible = None if unmasked and (not causal or num_queries == 1) else range_mask(first, end, num_keys)
        out, lse = _dense_attention(qt, kt, vt, visible, scale, dropout_p, guard_not_finite=guard)
        return out, (lse if return_lse else None)
    if sees is not None:
        # A row that sees no key would be NaN inside SDPA (and in its gradient): there it sees every key, and its
        # output is zeroed below.
        first = None if first is None else first.masked_fill(~sees, 0)
        end = end.masked_fill(~sees, num_keys)
    # [R, 1, Nq, Nk]: without key bounds R is 1, and SDPA broadcasts one mask over the batch.
    mask = range_mask(first, end, num_keys).unsqueeze(1)
    out = _sdpa(qt, kt, vt, attn_mask=mask, dropout_p=dropout_p, scale=scale).transpose(1, 2)
    if sees is None:
        return out, None
    return torch.where(sees.view(*sees.shape, 1, 1), out, out.new_zeros(())), None


def _sdpa(qt: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor, **kwargs) -> torch.Tensor:
    """SDPA on ``[B, H, N, D]``, with grouped key/value heads where there are fewer of them."""
    # A branch rather than enable_gqa=(Hq != Hkv): under torch.compile with dynamic shapes that comparison is a
    # SymBool, which SDPA refuses, while a branch on it is a guard.
    if qt.shape[1] != kt.shape[1]:
        return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True, **kwargs)
    return F.scaled_dot_product_attention(qt, kt, vt, **kwargs)


def _flash_returns_lse(qt: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor, dropout_p: float) -> bool:
    """Whether ``aten._scaled_dot_product_flash_attention_for_cpu`` can run the call (it is CPU only, has no
    dropout, and wants one head dim and one number of heads). Not for float64: the callers combine its results in
    float32 (the dense pass computes float64 in float64)."""
    return (
        qt.device.type == "cpu"
        and dropout_p == 0.0
        and qt.shape[-1] == kt.shape[-1] == vt.shape[-1]
        and qt.shape[1] == kt.shape[1]
        and qt.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and kt.shape[2] > 0
    )


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _prefix_causal_in_two_parts(
    qt: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix-causal attention without key bounds (``1 < Nq < Nk``), without a mask: every query sees the first
    ``Nk - Nq`` keys, and the last ``Nq`` keys are a square causal block. SDPA's CPU flash kernel runs the two parts
    with its own flags and returns each part's log-sum-exp, which weighs them together. A mask instead costs an
    ``[Nq, Nk]`` build and read, and the masked triangle's work: measured 1.3-1.5x slower in float32 (512 queries
    over 4096 keys, 1 thread). Forward only: the kernel's log-sum-exp has no gradient. ``[B, H, N, D]`` inputs;
    returns ``[B, Nq, H, D]`` and the float32 lse ``[B, H, Nq]``."""
    qt, kt, vt = _head_dim_contiguous(qt, kt, vt)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    split = kt.shape[2] - qt.shape[2]
    seen_by_all, seen_by_all_lse = flash(qt, kt[:, :, :split], vt[:, :, :split], scale=scale)
    triangle, triangle_lse = flash(qt, kt[:, :, split:], vt[:, :, split:], is_causal=True, scale=scale)
    out, lse = merge_partial_attention(
        seen_by_all.transpose(1, 2), seen_by_all_lse.float(), triangle.transpose(1, 2), triangle_lse.float()
    )
    return out.to(qt.dtype), lse


def _head_dim_contiguous(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """SDPA's CPU flash kernel reads each row's head dim as contiguous without checking (a view with a strided last
    dim gives garbage): such inputs are copied."""
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


def _cpu_flash_attention_with_lse(
    qt: torch.Tensor,
    kt: torch.Tensor,
    vt: torch.Tensor,
    visible: torch.Tensor | None,
    sees: torch.Tensor | None,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention and its float32 log-sum-exp from the CPU flash kernel. ``[B, H, N, D]`` inputs.

    ``visible`` ``[B or 1, Nq, Nk]`` or ``None`` for a call without a mask, where ``causal`` (``Nq`` is 1 or ``Nk``)
    is the kernel's own flag. ``sees`` ``[B or 1, Nq]``: which rows see a key, ``None`` when all do. The kernel gives
    a row that sees no key a zero output and a zero lse: its lse is set to ``-inf`` here, as the contract says.
    """
    num_queries = qt.shape[2]
    qt, kt, vt = _head_dim_contiguous(qt, kt, vt)
    if visible is None:
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        if causal and num_queries > 1:  # a branch: see attention_eager
            out, lse = flash(qt, kt, vt, is_causal=True, scale=scale)
        else:
            out, lse = flash(qt, kt, vt, scale=scale)
        return out.transpose(1, 2), lse.float().detach()
    bias = torch.zeros(visible.shape, dtype=qt.dtype, device=qt.device).masked_fill_(~visible, float("-inf"))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        qt, kt, vt, attn_mask=bias.unsqueeze(1), scale=scale
    )
    if sees is None:
        return out.transpose(1, 2), lse.float().detach()
    out = torch.where(sees.view(*sees.shape, 1, 1), out.transpose(1, 2), out.new_zeros(()))
    lse = torch.where(sees.unsqueeze(1), lse.float(), float("-inf"))
    return out, lse.detach()


def _dense_attention(
    qt: torch.Tensor,
    kt: torch.Tensor,
    vt: torch.Tensor,
    visible: torch.Tensor | None,
    scale: float,
    dropout_p: float,
    guard_not_finite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention and its log-sum-exp in one float32 pass (SDPA does not return the lse), float64 for float64 inputs.
    ``[B, H, N, D]`` inputs.

    The query heads sharing a k/v head are stacked as rows of one matrix, so grouped k/v are never copied.
    ``guard_not_finite``: keys and values that are not finite are kept out of the rows that do not see them, their
    gradients included (a row that sees one gets NaN, as the product would give it).
    """
    batch, num_q_heads, num_queries, qk_dim = qt.shape
    num_kv_heads, v_dim = kt.shape[1], vt.shape[-1]
    group = num_q_heads // num_kv_heads
    compute = torch.float64 if qt.dtype == torch.float64 else torch.float32  # float64 is never rounded to float32
    # Row g * Nq + i: head h_kv * G + g.
    rows = qt.reshape(batch, num_kv_heads, group * num_queries, qk_dim).to(compute)
    row_visible = None if visible is None else visible.repeat(1, group, 1).unsqueeze(1)  # [B, 1, G * Nq, Nk]
    keys = kt.to(compute)
    sees_bad = None
    if guard_not_finite and row_visible is not None:
        # Zeroed before the product, not masked after it: a masked score still passes 0 * NaN = NaN back to dq.
        bad = ~torch.isfinite(keys).all(dim=-1, keepdim=True) | ~torch.isfinite(vt).all(dim=-1, keepdim=True)
        keys = keys.masked_fill(bad, 0.0)
        sees_bad = torch.matmul(row_visible.float(), bad.float()) > 0  # [B, Hkv, G * Nq, 1]
    scores = torch.matmul(rows, keys.transpose(-1, -2)) * scale
    if row_visible is None:  # every row sees every key
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        probs = torch.exp(scores - lse)
    else:
        scores = scores.masked_fill(~row_visible, float("-inf"))  # also drops NaN scores of hidden keys
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        seen = lse != float("-inf")  # a row that sees a key (a NaN among them makes it NaN, as it should)
        probs = torch.where(seen, torch.exp(scores - torch.where(seen, lse, 0.0)), 0.0)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    values = vt.to(compute)
    if sees_bad is not None:
        values = values.masked_fill(bad, 0.0)
    out = torch.matmul(probs, values)
    if sees_bad is not None:
        out = out.masked_fill(sees_bad, float("nan"))
        lse = lse.masked_fill(sees_bad, float("nan"))
    out = out.reshape(batch, num_q_heads, num_queries, v_dim)
    lse = lse.reshape(batch, num_q_heads, num_queries).detach()
    return out.transpose(1, 2).to(qt.dtype), lse


@torch.library.custom_op("perceiver_fast::eager_attention_cpu", mutates_args=())
def _eager_attention_cpu(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_start: torch.Tensor | None,
    kv_len: torch.Tensor | None,
    causal: bool,
    scale: float,
    return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention_eager` on CPU tensors as one op that ``torch.compile`` does not trace into (no dropout, no
    gradient). Traced, the reference cannot read its key bounds on the host, and so zeroes every key outside them
    where it would narrow the keys to them (a decoding step over an 8k cache then copies the whole cache). Outputs
    are contiguous, as the fake says; the lse is empty when not asked for."""
    out, lse = attention_eager(
        q, k, v, causal=causal, kv_start=kv_start, kv_len=kv_len, scale=scale, return_lse=return_lse, dropout_p=0.0
    )
    return out.contiguous(), (lse.contiguous() if return_lse else q.new_empty(0, dtype=_lse_dtype(q)))


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@_eager_attention_cpu.register_fake
def _eager_attention_cpu_fake(q, k, v, kv_start, kv_len, causal, scale, return_lse):
    batch, num_queries, num_q_heads, _ = q.shape
    out = q.new_empty(batch, num_queries, num_q_heads, v.shape[3])
    lse = q.new_empty((batch, num_q_heads, num_queries) if return_lse else (0,), dtype=_lse_dtype(q))
    return out, lse


class EagerBackend:
    """The reference: runs every call the op accepts, on any device."""

    name = "eager"

    def unsupported_reason(self, problem: AttentionProblem) -> str | None:
        return None

    def run(self, q, k, v, **kwargs):
        # Traced without gradients on the CPU: one opaque op (is_compiling first, the cheapest test of an eager call).
        opaque = torch.compiler.is_compiling() and q.device.type == "cpu" and kwargs["dropout_p"] == 0.0
        if opaque and not _needs_grad(q, k, v):
            names = ("kv_start", "kv_len", "causal", "scale", "return_lse")
            out, lse = _eager_attention_cpu(q, k, v, *(kwargs[name] for name in names))
            return out, (lse if kwargs["return_lse"] else None)
        return attention_eager(q, k, v, **kwargs)


register_backend(EagerBackend())
