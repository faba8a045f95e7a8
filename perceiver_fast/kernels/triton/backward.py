"""Backward attention kernels: dq, dk, dv recomputed from the forward's log-sum-exp (P is never stored).

``delta = rowsum(dO * O)`` is computed first. Then one program per key block of one kv head accumulates dk and dv
over every query head of its group and every query block that can see the keys, and one program per query block of
one q head accumulates dq over its visible key blocks. No atomics: the result is deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from perceiver_fast.kernels.triton import config
from perceiver_fast.kernels.triton.forward import LOG2E, LOG2E_C, _key_range, _row_bounds, _unmasked_keys


@triton.jit
def _delta_kernel(
    OUT, DOUT, DELTA,
    stride_ob, stride_on, stride_oh, stride_od,
    stride_gb, stride_gn, stride_gh, stride_gd,
    num_q_heads, num_queries, head_dim_v,
    BLOCK_M: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_q_heads
    h = pid_bh % num_q_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (offs_m[:, None] < num_queries) & (offs_dv[None, :] < head_dim_v)
    o = tl.load(
        OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_dv[None, :] * stride_od,
        mask=mask,
        other=0.0,
    ).to(tl.float32)
    do = tl.load(
        DOUT + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gn + offs_dv[None, :] * stride_gd,
        mask=mask,
        other=0.0,
    ).to(tl.float32)
    tl.store(DELTA + pid_bh * num_queries + offs_m, tl.sum(o * do, 1), mask=offs_m < num_queries)


@triton.jit
def _probabilities(
    q, kt, lse2, offs_m, offs_n, start, length, num_queries, scale_log2,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Recompute P [BLOCK_M, BLOCK_N] from q [M, D], k^T [D, N] and the lse in log2 units; 0 where masked."""
    p = tl.math.exp2(tl.dot(q, kt, input_precision=DOT_PRECISION) * scale_log2 - lse2[:, None])
    if MASKED:
        visible = (offs_n[None, :] >= start) & (offs_n[None, :] < length)
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= (length - num_queries + offs_m)[:, None])
        p = tl.where(visible, p, 0.0)
    return p


@triton.jit
def _dkdv_blocks(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_gn, offs_n, offs_dqk, offs_dv,
    start, length, num_queries, head_dim_qk, head_dim_v, scale_log2, lo, hi,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Accumulate one key block's dk, dv over the query blocks ``[lo, hi)`` of one q head.

    Scores are formed transposed (``S^T = k q^T``, ``[BLOCK_N, BLOCK_M]``) so that every product has the key block
    as its rows: on sm_90 a warpgroup MMA needs 64 rows per warpgroup, and the key block is the tile that is large;
    ``P^T`` and ``dS^T`` then feed the dv and dk products straight from registers, with no transpose."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < num_queries
        q = tl.load(
            q_base + offs_m[:, None] * stride_qn, mask=row_ok[:, None] & (offs_dqk[None, :] < head_dim_qk), other=0.0
        )
        # Rows past Nq load do = 0 and lse = delta = 0: they add exactly zero even in unmasked blocks.
        do = tl.load(
            do_base + offs_m[:, None] * stride_gn, mask=row_ok[:, None] & (offs_dv[None, :] < head_dim_v), other=0.0
        )
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)
        # Rows that see no key have lse = -inf; every score of theirs is masked, any finite value will do.
        lse2 = tl.where(lse == float("-inf"), 0.0, lse * LOG2E_C)
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        pt = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * scale_log2 - lse2[None, :])
        if MASKED:
            visible = (offs_n[:, None] >= start) & (offs_n[:, None] < length)
            if CAUSAL:
                visible = visible & (offs_n[:, None] <= (length - num_queries + offs_m)[None, :])
            pt = tl.where(visible, pt, 0.0)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dst = pt * (dpt - delta[None, :])
        pt = pt.to(q_base.dtype.element_ty)
        dst = dst.to(q_base.dtype.element_ty)
        if UPCAST:
            pt = pt.to(tl.float32)
            dst = dst.to(tl.float32)
        dv = tl.dot(pt, do, dv, input_precision=DOT_PRECISION)
        dk = tl.dot(dst, q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _dq_blocks(
    dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_dqk, offs_dv,
    start, length, num_queries, num_keys, head_dim_qk, head_dim_v, scale_log2, lo, hi,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Accumulate one query block's dq over the key blocks ``[lo, hi)``."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_mask = offs_dqk[:, None] < head_dim_qk
        v_mask = offs_dv[:, None] < head_dim_v
        if MASKED:  # keys outside [kv_start, kv_len) are never loaded (see the forward)
            in_bounds = (offs_n[None, :] >= start) & (offs_n[None, :] < length)
            k_mask = k_mask & in_bounds
            v_mask = v_mask & in_bounds
        kt = tl.load(k_base + offs_n[None, :] * stride_kn, mask=k_mask, other=0.0)
        vt = tl.load(v_base + offs_n[None, :] * stride_vn, mask=v_mask, other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        p = _probabilities(
            q, kt, lse2, offs_m, offs_n, start, length, num_queries, scale_log2, MASKED, CAUSAL, DOT_PRECISION
        )
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
        ds = (p * (dp - delta[:, None])).to(k_base.dtype.element_ty)
        if UPCAST:
            ds = ds.to(tl.float32)
        dq += tl.dot(ds, tl.trans(kt), input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DOUT, LSE, DELTA, KV_START, KV_LEN, DK, DV,
    stride_qb, stride_qn, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_gb, stride_gn, stride_gh, stride_gd,
    num_kv_heads, num_queries, num_keys, head_dim_qk, head_dim_v, scale, scale_log2,
    q_bucket, k_bucket,  # autotune keys only
    GROUP: tl.constexpr,
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_DQK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_kv_heads
    h_kv = pid_bh % num_kv_heads
    num_q_heads = num_kv_heads * GROUP

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    key_ok = offs_n < num_keys
    start, length = _row_bounds(KV_START, KV_LEN, b, num_keys)
    # Keys outside [kv_start, kv_len) are never loaded (their gradients are zero whatever they hold).
    in_bounds = (offs_n >= start) & (offs_n < length)
    k = tl.load(
        K + b * stride_kb + h_kv * stride_kh + offs_n[:, None] * stride_kn + offs_dqk[None, :] * stride_kd,
        mask=in_bounds[:, None] & (offs_dqk[None, :] < head_dim_qk),
        other=0.0,
    )
    v = tl.load(
        V + b * stride_vb + h_kv * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
        mask=in_bounds[:, None] & (offs_dv[None, :] < head_dim_v),
        other=0.0,
    )
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)

    block_lo = pid_n * BLOCK_N
    # Query rows that see any key of this block: none when the block lies outside [start, length).
    m_hi = tl.where((block_lo < length) & (block_lo + BLOCK_N > start), num_queries, 0)
    m_lo = 0
    if CAUSAL:
        # Query i sees key j when j <= length - Nq + i, so rows before block_lo - length + Nq see nothing here.
        m_lo = (tl.maximum(block_lo - length + num_queries, 0) // BLOCK_M) * BLOCK_M

    # Query blocks whose every row sees every key of this block need no mask: from m_full on, when the block lies
    # wholly inside [start, length).
    m_full = m_hi
    if (block_lo >= start) & (block_lo + BLOCK_N <= length):
        m_full = 0
        if CAUSAL:
            m_full = tl.cdiv(tl.maximum(block_lo + BLOCK_N - 1 - length + num_queries, 0), BLOCK_M) * BLOCK_M
    m_full = tl.maximum(m_full, m_lo)

    dk = tl.zeros([BLOCK_N, BLOCK_DQK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for g in range(GROUP):
        h = h_kv * GROUP + g
        row_base = (b * num_q_heads + h) * num_queries
        q_base = Q + b * stride_qb + h * stride_qh + offs_dqk[None, :] * stride_qd
        do_base = DOUT + b * stride_gb + h * stride_gh + offs_dv[None, :] * stride_gd
        # Triton's compiler takes no starred arguments: each segment spells its call out.
        dk, dv = _dkdv_blocks(
            dk, dv, k, v, q_base, do_base, LSE + row_base, DELTA + row_base, stride_qn, stride_gn,
            offs_n, offs_dqk, offs_dv, start, length, num_queries, head_dim_qk, head_dim_v, scale_log2,
            m_lo, tl.minimum(m_full, m_hi), True, CAUSAL, UPCAST, DOT_PRECISION, BLOCK_M,
        )  # fmt: skip
        dk, dv = _dkdv_blocks(
            dk, dv, k, v, q_base, do_base, LSE + row_base, DELTA + row_base, stride_qn, stride_gn,
            offs_n, offs_dqk, offs_dv, start, length, num_queries, head_dim_qk, head_dim_v, scale_log2,
            m_full, m_hi, False, CAUSAL, UPCAST, DOT_PRECISION, BLOCK_M,
        )  # fmt: skip

    # DK and DV are allocated contiguous [B, Nk, Hkv, D], whatever the strides of k and v.
    key_rows = (b * num_keys + offs_n[:, None]) * num_kv_heads + h_kv
    tl.store(
        DK + key_rows * head_dim_qk + offs_dqk[None, :],
        (dk * scale).to(DK.dtype.element_ty),
        mask=key_ok[:, None] & (offs_dqk[None, :] < head_dim_qk),
    )
    tl.store(
        DV + key_rows * head_dim_v + offs_dv[None, :],
        dv.to(DV.dtype.element_ty),
        mask=key_ok[:, None] & (offs_dv[None, :] < head_dim_v),
    )


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DOUT, LSE, DELTA, KV_START, KV_LEN, DQ,
    stride_qb, stride_qn, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_gb, stride_gn, stride_gh, stride_gd,
    num_q_heads, num_queries, num_keys, head_dim_qk, head_dim_v, scale, scale_log2,
    q_bucket, k_bucket,  # autotune keys only
    GROUP: tl.constexpr,
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_DQK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_q_heads
    h = pid_bh % num_q_heads
    h_kv = h // GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < num_queries
    q_mask = row_ok[:, None] & (offs_dqk[None, :] < head_dim_qk)
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_dqk[None, :] * stride_qd,
        mask=q_mask,
        other=0.0,
    )
    do = tl.load(
        DOUT + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gn + offs_dv[None, :] * stride_gd,
        mask=row_ok[:, None] & (offs_dv[None, :] < head_dim_v),
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row_base = pid_bh * num_queries
    lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * LOG2E_C)
    delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)

    row_last = tl.minimum(pid_m * BLOCK_M + BLOCK_M, num_queries) - 1
    start, length, lo, hi = _key_range(KV_START, KV_LEN, b, row_last, num_queries, num_keys, CAUSAL, BLOCK_N)
    k_base = K + b * stride_kb + h_kv * stride_kh + offs_dqk[:, None] * stride_kd
    v_base = V + b * stride_vb + h_kv * stride_vh + offs_dv[:, None] * stride_vd
    dq = tl.zeros([BLOCK_M, BLOCK_DQK], dtype=tl.float32)
    if BLOCK_DQK > 128:
        # Three copies of the loop spill registers at head dim 256; one masked loop spills less.
        dq = _dq_blocks(
            dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_dqk, offs_dv, start, length,
            num_queries, num_keys, head_dim_qk, head_dim_v, scale_log2,
            lo, hi, True, CAUSAL, UPCAST, DOT_PRECISION, BLOCK_N,
        )  # fmt: skip
    else:
        # Triton's compiler takes no starred arguments: each segment spells its call out.
        full_lo, full_hi = _unmasked_keys(start, length, pid_m * BLOCK_M, num_queries, CAUSAL, BLOCK_N)
        dq = _dq_blocks(
            dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_dqk, offs_dv, start, length,
            num_queries, num_keys, head_dim_qk, head_dim_v, scale_log2,
            lo, tl.minimum(full_lo, hi), True, CAUSAL, UPCAST, DOT_PRECISION, BLOCK_N,
        )  # fmt: skip
        dq = _dq_blocks(
            dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_dqk, offs_dv, start, length,
            num_queries, num_keys, head_dim_qk, head_dim_v, scale_log2,
            full_lo, tl.minimum(full_hi, hi), False, CAUSAL, UPCAST, DOT_PRECISION, BLOCK_N,
        )  # fmt: skip
        dq = _dq_blocks(
            dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_dqk, offs_dv, start, length,
            num_queries, num_keys, head_dim_qk, head_dim_v, scale_log2,
            tl.maximum(full_hi, lo), hi, True, CAUSAL, UPCAST, DOT_PRECISION, BLOCK_N,
        )  # fmt: skip

    tl.store(
        DQ + ((b * num_queries + offs_m[:, None]) * num_q_heads + h) * head_dim_qk + offs_dqk[None, :],
        (dq * scale).to(DQ.dtype.element_ty),
        mask=q_mask,
    )


_KEY = ["BLOCK_DQK", "BLOCK_DV", "GROUP", "CAUSAL", "q_bucket", "k_bucket"]
_dkdv = triton.autotune(
    configs=config.configs(config.DKDV_TILES),
    key=_KEY,
    prune_configs_by={"early_config_prune": config.pruner(config.DKDV_TILES)},
)(_attn_bwd_dkdv_kernel)
_dq = triton.autotune(
    configs=config.configs(config.DQ_TILES),
    key=_KEY,
    prune_configs_by={"early_config_prune": config.pruner(config.DQ_TILES)},
)(_attn_bwd_dq_kernel)


def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kv_start: torch.Tensor,
    kv_len: torch.Tensor,
    *,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` (contiguous, input dtype) of the forward that produced ``out`` and ``lse``."""
    batch, num_queries, num_q_heads, head_dim_qk = q.shape
    num_keys, num_kv_heads, head_dim_v = k.shape[1], k.shape[2], v.shape[3]
    delta = torch.empty(batch, num_q_heads, num_queries, device=q.device, dtype=torch.float32)
    delta_block = 64 if not config.interpreting() else 32
    _delta_kernel[(config.cdiv(num_queries, delta_block), batch * num_q_heads)](
        out, grad_out, delta,
        *out.stride(), *grad_out.stride(),
        num_q_heads, num_queries, head_dim_v,
        BLOCK_M=delta_block,
        BLOCK_DV=config.head_block(head_dim_v),
    )  # fmt: skip

    dq = torch.empty(batch, num_queries, num_q_heads, head_dim_qk, device=q.device, dtype=q.dtype)
    dk = torch.empty(batch, num_keys, num_kv_heads, head_dim_qk, device=q.device, dtype=k.dtype)
    dv = torch.empty(batch, num_keys, num_kv_heads, head_dim_v, device=q.device, dtype=v.dtype)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    tail = (head_dim_qk, head_dim_v, scale, scale * LOG2E, config.length_bucket(num_queries))
    tail = (*tail, config.length_bucket(num_keys))
    common = dict(
        GROUP=num_q_heads // num_kv_heads,
        CAUSAL=causal,
        UPCAST=config.interpreting(),
        DOT_PRECISION=config.dot_precision(q.dtype),
        BLOCK_DQK=config.head_block(head_dim_qk),
        BLOCK_DV=config.head_block(head_dim_v),
    )
    grid_kv = lambda meta: (config.cdiv(num_keys, meta["BLOCK_N"]), batch * num_kv_heads)  # noqa: E731
    _dkdv[grid_kv](
        q, k, v, grad_out, lse, delta, kv_start, kv_len, dk, dv,
        *strides, num_kv_heads, num_queries, num_keys, *tail, **common,
    )  # fmt: skip
    grid_q = lambda meta: (config.cdiv(num_queries, meta["BLOCK_M"]), batch * num_q_heads)  # noqa: E731
    _dq[grid_q](
        q, k, v, grad_out, lse, delta, kv_start, kv_len, dq,
        *strides, num_q_heads, num_queries, num_keys, *tail, **common,
    )  # fmt: skip
    return dq, dk, dv
