"""Forward attention kernels: flash-style tiles with an online fp32 softmax, and a split-KV variant.

One program owns ``BLOCK_M`` query rows of one (batch, q head) and walks the key blocks that some of its rows can
see: blocks before ``kv_start[b]`` and past the causal edge (or ``kv_len[b]``) are never loaded, and only the blocks
at those edges pay for masks. With few query blocks (decoding over a long cache, or Perceiver AR at batch 1) the key
range is cut into ``NUM_SPLITS`` pieces that run as separate programs; each writes a normalized partial output and
its lse, and one reduction pass combines them. When decoding with grouped heads, the q heads that share a kv head
are packed into one tile, so the cache is read once per kv head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from perceiver_fast.kernels.triton import config

LOG2E = 1.4426950408889634
# Globals read inside @triton.jit must be constexpr, or the GPU compiler rejects them (the interpreter does not).
LN2 = tl.constexpr(0.6931471805599453)
LOG2E_C = tl.constexpr(LOG2E)


@triton.jit
def _row_bounds(kv_start_ptr, kv_len_ptr, b, num_keys):
    """A batch row's keys ``[start, length)``. Bounds are not checked on the GPU (that would be a host sync): values
    out of range are clamped, so they read no memory outside the keys."""
    length = tl.minimum(tl.maximum(tl.load(kv_len_ptr + b), 0), num_keys)
    start = tl.minimum(tl.maximum(tl.load(kv_start_ptr + b), 0), length)
    return start, length


@triton.jit
def _key_range(
    kv_start_ptr, kv_len_ptr, b, row_last, num_queries, num_keys, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr
):
    """Keys some row up to ``row_last`` can see: ``[lo, hi)`` with ``lo`` aligned down to a key block."""
    start, length = _row_bounds(kv_start_ptr, kv_len_ptr, b, num_keys)
    hi = length
    if CAUSAL:
        # Bottom-right alignment: query i sits at key position length - Nq + i.
        hi = tl.minimum(hi, length - num_queries + row_last + 1)
    lo = (start // BLOCK_N) * BLOCK_N
    return start, length, lo, hi


@triton.jit
def _unmasked_keys(start, length, row_first, num_queries, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """Block-aligned ``[full_lo, full_hi)``: keys every row from ``row_first`` on can see (no mask needed there)."""
    full_lo = tl.cdiv(start, BLOCK_N) * BLOCK_N
    full_hi = length
    if CAUSAL:
        full_hi = tl.minimum(full_hi, length - num_queries + row_first + 1)
    full_hi = (tl.maximum(full_hi, 0) // BLOCK_N) * BLOCK_N  # clamp first: integer division truncates toward 0
    return full_lo, tl.maximum(full_hi, full_lo)


@triton.jit
def _fwd_blocks(
    acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_dqk, offs_dv,
    start, length, num_queries, num_keys, head_dim_qk, head_dim_v, scale_log2, lo, hi,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Online-softmax steps over key blocks ``[lo, hi)``; ``MASKED`` adds the bounds and causal masks."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_mask = offs_dqk[:, None] < head_dim_qk
        v_mask = offs_dv[None, :] < head_dim_v
        if MASKED:
            # Interior blocks lie inside [kv_start, kv_len). Edge blocks never load the keys outside it: a cache may
            # hold anything there, and a masked score still multiplies its value (0 * NaN is NaN).
            in_bounds = (offs_n >= start) & (offs_n < length)
            k_mask = k_mask & in_bounds[None, :]
            v_mask = v_mask & in_bounds[:, None]
        k = tl.load(k_base + offs_n[None, :] * stride_kn, mask=k_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn, mask=v_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2
        if MASKED:
            visible = (offs_n[None, :] >= start) & (offs_n[None, :] < length)
            if CAUSAL:
                # Bottom-right alignment: query i sits at key position length - Nq + i.
                visible = visible & (offs_n[None, :] <= (length - num_queries + offs_m)[:, None])
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no key yet keeps max -inf; subtracting 0 instead keeps exp2 at 0 rather than NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        # P is rounded to the value dtype as on the GPU path, so the interpreter checks the same numerics.
        p = p.to(v_base.dtype.element_ty)
        if UPCAST:
            p = p.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, KV_START, KV_LEN, OUT, LSE,
    stride_qb, stride_qn, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_on, stride_oh, stride_od,
    batch, num_q_heads, num_queries, num_keys, head_dim_qk, head_dim_v, scale_log2,
    q_bucket, k_bucket,  # autotune keys only
    GROUP: tl.constexpr,
    CAUSAL: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    PACK_GQA: tl.constexpr,
    EDGE_LOOPS: tl.constexpr,  # unmasked interior blocks in a loop of their own (the big tiles; not decoding)
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_DQK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_split = tl.program_id(2)
    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if PACK_GQA:
        # Decoding with grouped heads: the GROUP q heads that share a kv head are rows of one tile (row r is query
        # r % Nq of head r // Nq), so the cache is read once per kv head and the tile has more than Nq rows.
        num_kv_heads = num_q_heads // GROUP
        b = pid_bh // num_kv_heads
        h_kv = pid_bh % num_kv_heads
        row_ok = offs_r < num_queries * GROUP
        offs_m = offs_r % num_queries
        heads = h_kv * GROUP + offs_r // num_queries
        row_last = tl.max(tl.where(row_ok, offs_m, 0), 0)
    else:
        b = pid_bh // num_q_heads
        h = pid_bh % num_q_heads
        h_kv = h // GROUP
        row_ok = offs_r < num_queries
        offs_m = offs_r
        heads = tl.zeros([BLOCK_M], dtype=tl.int32) + h
        row_last = tl.minimum(pid_m * BLOCK_M + BLOCK_M, num_queries) - 1
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    start, length, lo, hi = _key_range(KV_START, KV_LEN, b, row_last, num_queries, num_keys, CAUSAL, BLOCK_N)
    if NUM_SPLITS > 1:
        blocks = tl.maximum(tl.cdiv(hi - lo, BLOCK_N), 0)
        per_split = tl.cdiv(blocks, NUM_SPLITS)
        lo = lo + pid_split * per_split * BLOCK_N
        hi = tl.minimum(hi, lo + per_split * BLOCK_N)

    q_rows = b * stride_qb + heads * stride_qh + offs_m * stride_qn
    q = tl.load(
        Q + q_rows[:, None] + offs_dqk[None, :] * stride_qd,
        mask=row_ok[:, None] & (offs_dqk[None, :] < head_dim_qk),
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + h_kv * stride_kh + offs_dqk[:, None] * stride_kd
    v_base = V + b * stride_vb + h_kv * stride_vh + offs_dv[None, :] * stride_vd
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    if EDGE_LOOPS:
        # Only blocks at the edges (kv_start, the causal diagonal, kv_len) need masks: walk them apart from the
        # interior, within this program's share of the keys when they are split. Triton's compiler takes no
        # starred arguments: each segment spells its call out.
        full_lo, full_hi = _unmasked_keys(start, length, pid_m * BLOCK_M, num_queries, CAUSAL, BLOCK_N)
        full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
        full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
        acc, l_i, m_i = _fwd_blocks(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_dqk, offs_dv,
            start, length, num_queries, num_keys, head_dim_qk, head_dim_v, scale_log2,
            lo, full_lo, True, CAUSAL, UPCAST, DOT_PRECISION, BLOCK_N,
        )  # fmt: skip
        acc, l_i, m_i = _fwd_blocks(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_dqk, offs_dv,
            start, length, num_queries, num_keys, head_dim_qk, head_dim_v, scale_log2,
            full_lo, full_hi, False, CAUSAL, UPCAST, DOT_PRECISION, BLOCK_N,
        )  # fmt: skip
        acc, l_i, m_i = _fwd_blocks(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_dqk, offs_dv,
            start, length, num_queries, num_keys, head_dim_qk, head_dim_v, scale_log2,
            full_hi, hi, True, CAUSAL, UPCAST, DOT_PRECISION, BLOCK_N,
        )  # fmt: skip
    else:
        # Decoding is bandwidth-bound: the masks' arithmetic hides under the loads, and one loop instead of three
        # keeps the code and the registers of two more pipelined copies out.
        acc, l_i, m_i = _fwd_blocks(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_dqk, offs_dv,
            start, length, num_queries, num_keys, head_dim_qk, head_dim_v, scale_log2,
            lo, hi, True, CAUSAL, UPCAST, DOT_PRECISION, BLOCK_N,
        )  # fmt: skip

    sees_a_key = l_i > 0.0
    l_safe = tl.where(sees_a_key, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(sees_a_key, (m_i + tl.math.log2(l_safe)) * LN2, float("-inf"))
    # OUT is [B, Nq, Hq, Dv] (or [S, B, Nq, Hq, Dv] fp32 partials); LSE is [B, Hq, Nq] (or [S, B, Hq, Nq]).
    o_ptrs = OUT + (b * stride_ob + heads * stride_oh + offs_m * stride_on)[:, None] + offs_dv[None, :] * stride_od
    lse_ptrs = LSE + (b * num_q_heads + heads) * num_queries + offs_m
    if NUM_SPLITS > 1:
        o_ptrs += pid_split * batch * stride_ob
        lse_ptrs += pid_split * batch * num_q_heads * num_queries
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < head_dim_v))
    tl.store(lse_ptrs, lse, mask=row_ok)


@triton.jit
def _combine_splits_kernel(
    O_PART, LSE_PART, OUT, LSE,
    stride_ob, stride_on, stride_oh, stride_od,
    num_q_heads, num_queries, head_dim_v,
    NUM_SPLITS: tl.constexpr,
    SPLITS_P2: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):  # fmt: skip
    # One program per (b, h, i) row: partial outputs are normalized, so weight each by exp(lse_s - lse).
    row = tl.program_id(0)  # row = (b * Hq + h) * Nq + i, the LSE layout
    i = row % num_queries
    h = (row // num_queries) % num_q_heads
    b = row // (num_queries * num_q_heads)
    rows = tl.num_programs(0)
    splits = tl.arange(0, SPLITS_P2)
    offs_dv = tl.arange(0, BLOCK_DV)
    split_ok = splits < NUM_SPLITS
    lse_s = tl.load(LSE_PART + splits * rows + row, mask=split_ok, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_safe)
    total = tl.sum(w, 0)
    part_row = (b * num_queries + i) * num_q_heads + h  # O_PART is contiguous [S, B, Nq, Hq, Dv]
    o_ptrs = O_PART + (splits[:, None] * rows + part_row) * head_dim_v + offs_dv[None, :]
    o = tl.load(o_ptrs, mask=split_ok[:, None] & (offs_dv[None, :] < head_dim_v), other=0.0)
    sees_a_key = total > 0.0
    out = tl.sum(o * w[:, None], 0) / tl.where(sees_a_key, total, 1.0)
    lse = tl.where(sees_a_key, m_safe + tl.log(tl.where(sees_a_key, total, 1.0)), float("-inf"))
    tl.store(
        OUT + b * stride_ob + i * stride_on + h * stride_oh + offs_dv * stride_od,
        out.to(OUT.dtype.element_ty),
        mask=offs_dv < head_dim_v,
    )
    tl.store(LSE + row, lse)


_KEY = ["BLOCK_DQK", "BLOCK_DV", "GROUP", "CAUSAL", "NUM_SPLITS", "PACK_GQA", "q_bucket", "k_bucket"]
_fwd = triton.autotune(
    configs=config.configs(config.FORWARD_TILES),
    key=_KEY,
    prune_configs_by={"early_config_prune": config.pruner(config.FORWARD_TILES)},
)(_attn_fwd_kernel)
_fwd_split = triton.autotune(
    configs=config.configs(config.SPLIT_TILES),
    key=[*_KEY, "BLOCK_M"],
    prune_configs_by={"early_config_prune": config.pruner(config.SPLIT_TILES)},
)(_attn_fwd_kernel)

DECODE_MAX_QUERIES = 16
MAX_SPLITS = 64


@dataclass(frozen=True)
class Plan:
    """How to launch the forward: query tile rows, key-range splits, and whether grouped heads share a tile."""

    block_m: int | None  # None: the plain kernel's autotuned tiles; else the decode kernel's fixed rows
    splits: int
    pack_gqa: bool


def decode_block_m(num_queries: int, group: int, head_block: int) -> int:
    """Rows of a decoding tile: the ``group * Nq`` rows of a packed kv head, at least 16 (what ``tl.dot`` needs).

    Up to 64 rows (head dims to 128) fit one tile without spilling on sm_90, so a kv head's cache is read once for
    groups up to 64 rows; 64-row tiles also run on warpgroup MMA. Head dim 256 keeps 16 rows."""
    return min(64 if head_block <= 128 else 16, max(16, config.next_power_of_2(num_queries * group)))


# Decode tiles leave room for two resident programs per SM (config.SPLIT_TILES; test_triton_compile checks it).
DECODE_PROGRAMS_PER_SM = 2


def decode_splits(programs: int, num_keys: int, sms: int) -> int:
    """Key-range pieces for ``programs`` decoding tiles: as many as fit in one wave of two programs per SM.

    Rounding down matters: 16 heads at batch 1 on 132 SMs take 16 splits (256 programs, all resident at once);
    rounding up took 17, and the 8 programs past 264 would wait for a second wave. Each piece keeps at least four
    64-key blocks so it amortizes its share of the reduction pass.
    """
    fit = (DECODE_PROGRAMS_PER_SM * sms) // max(programs, 1)
    return max(1, min(fit, config.cdiv(num_keys, 64) // 4, MAX_SPLITS))


def plan_forward(
    batch: int,
    num_queries: int,
    num_keys: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_block: int,
    device: torch.device,
) -> Plan:
    """Choose the forward's launch for a problem.

    Decoding (``Nq <= 16``) takes the decode tiles: with one query block per head, splitting the cache is the
    parallelism left (:func:`decode_splits`), and grouped q heads are packed into one tile (``GROUP * Nq`` rows) so
    each kv head's cache is read once (:func:`decode_block_m`; ``head_block`` is the widest padded head dim). Longer
    queries keep the autotuned tiles and split only when their query blocks cannot fill the GPU (DESIGN.md: Perceiver
    AR at batch 1). The interpreter splits decoding into a few pieces so that tests walk the reduction pass.
    """
    group = num_q_heads // num_kv_heads
    key_blocks = config.cdiv(num_keys, 64)
    if num_queries > DECODE_MAX_QUERIES:
        # The plain kernel's autotuned tiles, split only when its 128-row query blocks leave SMs idle.
        if config.interpreting():
            return Plan(None, 1, False)
        programs = batch * num_q_heads * config.cdiv(num_queries, 128)
        sms = config.num_sms(device.index if device.index is not None else torch.cuda.current_device())
        if programs >= sms or key_blocks < 8:
            return Plan(None, 1, False)
        splits = min(config.cdiv(2 * sms, programs), max(1, key_blocks // 4), MAX_SPLITS)
        return Plan(None, splits, False)
    pack = group > 1
    rows = num_queries * group if pack else num_queries
    block_m = decode_block_m(num_queries, group, head_block)
    heads = num_kv_heads if pack else num_q_heads
    if config.interpreting():
        return Plan(block_m, min(4, config.cdiv(num_keys, 32)), pack)
    sms = config.num_sms(device.index if device.index is not None else torch.cuda.current_device())
    programs = batch * heads * config.cdiv(rows, block_m)
    return Plan(block_m, decode_splits(programs, num_keys, sms), pack)


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_start: torch.Tensor,
    kv_len: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward on validated ``[B, N, H, D]`` tensors (any strides); returns ``(out, lse)``.

    ``kv_start``/``kv_len`` are int32 ``[B]`` (materialized by the caller). ``num_splits`` overrides the planned
    split count (tests use it to walk every path on one shape).
    """
    batch, num_queries, num_q_heads, head_dim_qk = q.shape
    num_keys, num_kv_heads, head_dim_v = k.shape[1], k.shape[2], v.shape[3]
    out = torch.empty(batch, num_queries, num_q_heads, head_dim_v, device=q.device, dtype=q.dtype)
    lse = torch.empty(batch, num_q_heads, num_queries, device=q.device, dtype=torch.float32)
    head_block = max(config.head_block(head_dim_qk), config.head_block(head_dim_v))
    plan = plan_forward(batch, num_queries, num_keys, num_q_heads, num_kv_heads, head_block, q.device)
    if num_splits is not None:
        plan = Plan(plan.block_m, num_splits, plan.pack_gqa)
    group = num_q_heads // num_kv_heads
    common = dict(
        GROUP=group,
        CAUSAL=causal,
        NUM_SPLITS=plan.splits,
        PACK_GQA=plan.pack_gqa,
        EDGE_LOOPS=plan.block_m is None,
        UPCAST=config.interpreting(),
        DOT_PRECISION=config.dot_precision(q.dtype),
        BLOCK_DQK=config.head_block(head_dim_qk),
        BLOCK_DV=config.head_block(head_dim_v),
    )
    sizes = (batch, num_q_heads, num_queries, num_keys, head_dim_qk, head_dim_v, scale * LOG2E)
    buckets = (config.length_bucket(num_queries), config.length_bucket(num_keys))
    rows, heads = (num_queries * group, num_kv_heads) if plan.pack_gqa else (num_queries, num_q_heads)
    if plan.block_m is None:
        kernel = _fwd
        grid = lambda meta: (config.cdiv(rows, meta["BLOCK_M"]), batch * heads, plan.splits)  # noqa: E731
    else:
        kernel = _fwd_split
        grid = (config.cdiv(rows, plan.block_m), batch * heads, plan.splits)
        common["BLOCK_M"] = plan.block_m
    if plan.splits == 1:
        kernel[grid](
            q, k, v, kv_start, kv_len, out, lse,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            *sizes, *buckets, **common,
        )  # fmt: skip
        return out, lse

    o_part = torch.empty(plan.splits, *out.shape, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(plan.splits, *lse.shape, device=q.device, dtype=torch.float32)
    kernel[grid](
        q, k, v, kv_start, kv_len, o_part, lse_part,
        *q.stride(), *k.stride(), *v.stride(), *o_part.stride()[1:],
        *sizes, *buckets, **common,
    )  # fmt: skip
    _combine_splits_kernel[(batch * num_q_heads * num_queries,)](
        o_part, lse_part, out, lse,
        *out.stride(),
        num_q_heads, num_queries, head_dim_v,
        NUM_SPLITS=plan.splits,
        SPLITS_P2=config.next_power_of_2(plan.splits),
        BLOCK_DV=config.next_power_of_2(head_dim_v),
    )  # fmt: skip
    return out, lse
