"""A plain float64 implementation of the attention op contract: the oracle every backend is compared with.

Written independently of ``perceiver_fast.kernels.reference`` (explicit per-row loops for the mask, no SDPA) so
that a shared mistake is unlikely.
"""

from __future__ import annotations

import torch


def attention_oracle(q, k, v, *, causal=False, kv_start=None, kv_len=None, scale=None):
    """Return ``(out [B, Nq, Hq, Dv] float64, lse [B, Hq, Nq] float64)``, differentiable in q, k, v."""
    q, k, v = (t.double() for t in (q, k, v))
    batch, num_queries, num_q_heads, head_dim = q.shape
    num_keys, num_kv_heads = k.shape[1], k.shape[2]
    group = num_q_heads // num_kv_heads
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    scale = head_dim**-0.5 if scale is None else scale

    allowed = torch.zeros(batch, num_queries, num_keys, dtype=torch.bool)
    for b in range(batch):
        start = 0 if kv_start is None else int(kv_start[b])
        length = num_keys if kv_len is None else int(kv_len[b])
        for i in range(num_queries):
            last = length - 1 if not causal else min(length - 1, length - num_queries + i)
            if last >= start:
                allowed[b, i, start : last + 1] = True
    allowed = allowed.to(q.device).unsqueeze(1)  # [B, 1, Nq, Nk]

    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    sees_a_key = allowed.any(dim=-1, keepdim=True)
    probs = torch.where(sees_a_key, torch.exp(scores - torch.where(sees_a_key, lse.unsqueeze(-1), 0.0)), 0.0)
    out = torch.einsum("bhij,bjhd->bihd", probs, v)
    return out, lse


def random_bounds(batch, num_keys, *, generator=None, ragged=True, padded=True, allow_empty=False):
    """Random ``kv_start``/``kv_len`` (int32) for ragged, left-padded rows; ``allow_empty`` permits start == len."""
    if ragged:
        low = 0 if allow_empty else 1
        kv_len = torch.randint(low, num_keys + 1, (batch,), generator=generator, dtype=torch.int32)
    else:
        kv_len = torch.full((batch,), num_keys, dtype=torch.int32)
    if padded:
        frac = torch.rand(batch, generator=generator)
        top = kv_len if allow_empty else (kv_len - 1).clamp(min=0)
        kv_start = (frac * (top + 1).float()).floor().to(torch.int32).minimum(top)
    else:
        kv_start = None
    return kv_start, (kv_len if ragged else None)


def max_rel_error(actual, expected):
    """Largest |actual - expected| over the largest |expected|, in float64.

    The denominator is floored at 0.1 so that an all-zero expectation (e.g. dq of rows that see one key) is judged
    by absolute error instead of dividing by zero; the random test data is of order one.
    """
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).abs().max() / expected.abs().max().clamp(min=0.1))


def rotary_oracle(t, cos, sin):
    """``t [B, N, H, D]`` in float64 with rotary on its first ``R`` channels, pair by pair (``cos``/``sin``
    ``[B, R]``, one angle per channel, as interleaved pairs); ``cos is None``: no rotary."""
    t = t.double()
    if cos is None:
        return t
    out = t.clone()
    c, s = cos.double().reshape(t.shape[0], 1, 1, -1), sin.double().reshape(t.shape[0], 1, 1, -1)
    for i in range(0, c.shape[-1], 2):
        out[..., i] = t[..., i] * c[..., i] - t[..., i + 1] * s[..., i]
        out[..., i + 1] = t[..., i + 1] * c[..., i + 1] + t[..., i] * s[..., i + 1]
    return out
