"""Eager PyTorch implementation of the attention op contract (see :mod:`perceiver_fast.kernels.api`).

It is the CPU path, the fallback of every other backend, and what the kernels are checked against. The output goes
through ``F.scaled_dot_product_attention``, which is exact for every case of the contract once rows that see no key
are taken care of (they are given a visible key, computed and zeroed, so no NaN reaches forward or backward).
Calls without key bounds skip the mask entirely (SDPA's own causal flag, or none for a single query). Calls that
ask for the log-sum-exp take one dense float32 pass instead (SDPA does not return it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def visible_keys(
    batch: int,
    num_queries: int,
    num_keys: int,
    *,
    causal: bool,
    kv_start: torch.Tensor | None,
    kv_len: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor | None:
    """``[B, Nq, Nk]`` bool, True where query ``i`` may see key ``j``; ``None`` when every query sees every key."""
    if not causal and kv_start is None and kv_len is None:
        return None
    keys = torch.arange(num_keys, device=device)
    length = kv_len if kv_len is not None else torch.full((batch,), num_keys, device=device, dtype=torch.int32)
    length = length.view(batch, 1, 1)
    visible = keys.view(1, 1, num_keys) < length
    if kv_start is not None:
        visible = visible & (keys.view(1, 1, num_keys) >= kv_start.view(batch, 1, 1))
    if causal:
        position = length - num_queries + torch.arange(num_queries, device=device).view(1, num_queries, 1)
        visible = visible & (keys.view(1, 1, num_keys) <= position)
    return visible.expand(batch, num_queries, num_keys)


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
    batch, num_queries, num_q_heads, _ = q.shape
    num_keys, num_kv_heads = k.shape[1], k.shape[2]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # views: SDPA wants [B, H, N, D]
    # Without bounds, causal masking is SDPA's own (top-left equals bottom-right when Nq == Nk) or void (one query
    # at the last position sees every key): no mask to build, and no row can be empty.
    unmasked = kv_start is None and kv_len is None and (not causal or num_queries in (1, num_keys))
    visible = None
    if not unmasked or (return_lse and causal and num_queries > 1):
        visible = visible_keys(
            batch, num_queries, num_keys, causal=causal, kv_start=kv_start, kv_len=kv_len, device=q.device
        )
    if return_lse:
        return _dense_attention(qt, kt, vt, visible, scale, dropout_p)
    if unmasked:
        out = F.scaled_dot_product_attention(
            qt, kt, vt, dropout_p=dropout_p, scale=scale, is_causal=causal and num_queries > 1,
            enable_gqa=num_q_heads != num_kv_heads,
        )
        return out.transpose(1, 2), None
    row_sees_a_key = visible.any(dim=-1)  # [B, Nq]
    # A fully masked row would be NaN inside SDPA (and in its gradient): let it see everything, zero it below.
    sdpa_mask = (visible | ~row_sees_a_key.unsqueeze(-1)).unsqueeze(1)
    out = F.scaled_dot_product_attention(
        qt, kt, vt, attn_mask=sdpa_mask, dropout_p=dropout_p, scale=scale, enable_gqa=num_q_heads != num_kv_heads
    ).transpose(1, 2)
    return torch.where(row_sees_a_key.view(batch, num_queries, 1, 1), out, out.new_zeros(())), None


def _dense_attention(
    qt: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor, visible: torch.Tensor | None, scale: float, dropout_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention and its log-sum-exp in one float32 pass (SDPA does not return the lse). ``[B, H, N, D]`` inputs.

    The query heads sharing a k/v head are stacked as rows of one matrix, so grouped k/v are never copied.
    """
    batch, num_q_heads, num_queries, _ = qt.shape
    num_kv_heads = kt.shape[1]
    group = num_q_heads // num_kv_heads
    rows = qt.reshape(batch, num_kv_heads, group * num_queries, -1).float()  # row g * Nq + i: head h_kv * G + g
    scores = torch.matmul(rows, kt.float().transpose(-1, -2)) * scale
    if visible is None:  # every row sees every key
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        probs = torch.exp(scores - lse)
    else:
        scores = scores.masked_fill(~visible.repeat(1, group, 1).unsqueeze(1), float("-inf"))
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        seen = torch.isfinite(lse)
        probs = torch.where(seen, torch.exp(scores - torch.where(seen, lse, 0.0)), 0.0)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    out = torch.matmul(probs, vt.float()).reshape(batch, num_q_heads, num_queries, -1)
    lse = lse.reshape(batch, num_q_heads, num_queries).detach()
    return out.transpose(1, 2).to(qt.dtype), lse
