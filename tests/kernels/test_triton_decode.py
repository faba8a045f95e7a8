"""Decoding over a KV cache: the split-KV forward and its reduction pass, in Triton's interpreter on CPU."""

from __future__ import annotations

import pytest
import torch

from perceiver_fast.kernels import attention
from tests.oracle import attention_oracle, max_rel_error

pytest.importorskip("triton")
forward = pytest.importorskip("perceiver_fast.kernels.triton.forward")


def _cache(batch=3, nq=1, nk=160, hq=8, hkv=2, dim=64, dtype=torch.float32):
    q = torch.randn(batch, nq, hq, dim, dtype=dtype)
    k = torch.randn(batch, nk, hkv, dim, dtype=dtype)
    v = torch.randn(batch, nk, hkv, dim, dtype=dtype)
    # A preallocated cache: rows filled to different lengths, some with left padding of their prompt.
    kv_len = torch.tensor([1, 37, nk][:batch], dtype=torch.int32)
    kv_start = torch.tensor([0, 5, 30][:batch], dtype=torch.int32)
    return q, k, v, kv_start, kv_len


@pytest.mark.parametrize("nq", [1, 4, 16])
def test_small_query_counts_take_the_split_path_with_packed_heads(nq):
    cpu = torch.device("cpu")
    plan = forward.plan_forward(3, nq, 160, 8, 2, 64, cpu)
    assert plan.block_m is not None and plan.splits > 1 and plan.pack_gqa
    assert plan.block_m == max(16, 4 * nq)  # four q heads per kv head share one tile: the cache is read once
    assert forward.plan_forward(3, nq, 160, 8, 2, 128, cpu).block_m == plan.block_m
    assert forward.plan_forward(3, nq, 160, 8, 2, 256, cpu).block_m == 16  # widest heads: smaller tiles
    assert not forward.plan_forward(3, nq, 160, 8, 8, 64, cpu).pack_gqa
    assert forward.plan_forward(3, 64, 160, 8, 2, 64, cpu) == forward.Plan(None, 1, False)


@pytest.mark.parametrize(
    "batch, heads, num_keys, splits",
    [
        (1, 16, 65536, 16),  # B1 H16 M64k: 256 programs, every SM busy and none waiting for a second wave
        (8, 16, 16384, 2),  # B8 H16: 128 programs take 2 splits each
        (1, 4, 65536, 64),  # few heads: capped at MAX_SPLITS
        (1, 16, 512, 2),  # a short cache: at least four 64-key blocks per split
        (64, 16, 65536, 1),  # enough heads to fill the GPU unsplit
    ],
)
def test_decode_splits_fill_one_wave_on_132_sms(batch, heads, num_keys, splits):
    """An H100/H200 has 132 SMs and holds two decode programs per SM (see compile_check for their registers)."""
    got = forward.decode_splits(batch * heads, num_keys, 132)
    assert got == splits
    assert batch * heads * got <= forward.DECODE_PROGRAMS_PER_SM * 132 or got == 1


@pytest.mark.parametrize("heads", [(8, 2), (8, 1)], ids=["group4", "group8"])
@pytest.mark.parametrize("nq", [1, 3, 16])
def test_decode_matches_oracle(nq, heads):
    """Packed grouped heads: 4 to 128 rows per kv head, so one tile of 16 to 64 rows, or two of 64."""
    q, k, v, kv_start, kv_len = _cache(nq=nq, hq=heads[0], hkv=heads[1])
    kv_len = kv_len.clamp(min=nq)
    out, lse = attention(q, k, v, causal=True, kv_start=kv_start, kv_len=kv_len, return_lse=True, backend="triton")
    ref, ref_lse = attention_oracle(q, k, v, causal=True, kv_start=kv_start, kv_len=kv_len)
    assert max_rel_error(out, ref) < 1e-5
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("splits", [1, 2, 3, 7, 16])
def test_any_split_count_gives_the_same_answer(splits):
    """Split counts above the number of key blocks leave some splits empty; the reduction must ignore them."""
    q, k, v, kv_start, kv_len = _cache(nq=2)
    kv_len = kv_len.clamp(min=2)
    out, lse = forward.attention_forward(
        q, k, v, kv_start, kv_len, causal=True, scale=q.shape[-1] ** -0.5, num_splits=splits
    )
    ref, ref_lse = attention_oracle(q, k, v, causal=True, kv_start=kv_start, kv_len=kv_len)
    assert max_rel_error(out, ref) < 1e-5
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("splits", [2, 5])
@pytest.mark.parametrize("causal", [True, False])
def test_long_queries_split_with_the_plain_tiles(splits, causal):
    """Perceiver AR at batch 1 splits the key range of full query tiles (few query blocks for many SMs)."""
    q, k, v, kv_start, kv_len = _cache(batch=2, nq=40, nk=150, hq=4, hkv=2, dim=40)
    kv_len, kv_start = kv_len[:2].clamp(min=45), kv_start[:2]
    out, lse = forward.attention_forward(
        q, k, v, kv_start, kv_len, causal=causal, scale=q.shape[-1] ** -0.5, num_splits=splits
    )
    ref, ref_lse = attention_oracle(q, k, v, causal=causal, kv_start=kv_start, kv_len=kv_len)
    assert max_rel_error(out, ref) < 1e-5
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)


def test_decode_steps_equal_rows_of_the_full_causal_forward():
    """Step t of decoding (one query, kv_len = t + 1) is row t of causal self-attention over the whole sequence."""
    q, k, v, _, _ = _cache(batch=2, nq=24, nk=24, hq=4, hkv=4, dim=32)
    full = attention(q, k, v, causal=True, backend="triton")
    for t in (0, 7, 23):
        kv_len = torch.full((2,), t + 1, dtype=torch.int32)
        step = attention(q[:, t : t + 1], k, v, causal=True, kv_len=kv_len, backend="triton")
        assert max_rel_error(step, full[:, t : t + 1]) < 1e-5


def test_empty_cache_rows_decode_to_zero():
    q, k, v, _, _ = _cache(batch=2)
    kv_len = torch.tensor([0, 90], dtype=torch.int32)
    kv_start = torch.tensor([0, 90], dtype=torch.int32)
    out, lse = attention(q, k, v, causal=True, kv_start=kv_start, kv_len=kv_len, return_lse=True, backend="triton")
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_low_precision(dtype):
    q, k, v, kv_start, kv_len = _cache(nq=2, dtype=dtype)
    kv_len = kv_len.clamp(min=2)
    out = attention(q, k, v, causal=True, kv_start=kv_start, kv_len=kv_len, backend="triton")
    ref, _ = attention_oracle(q, k, v, causal=True, kv_start=kv_start, kv_len=kv_len)
    rounding = (ref.to(dtype).double() - ref).abs().max()
    atol = 1e-3 if dtype == torch.float16 else 8e-3
    assert out.dtype == dtype
    assert (out.double() - ref).abs().max() <= 2 * rounding + atol


def test_decode_gradients():
    q, k, v, kv_start, kv_len = _cache(nq=4)
    kv_len = kv_len.clamp(min=4)
    for t in (q, k, v):
        t.requires_grad_()
    out = attention(q, k, v, causal=True, kv_start=kv_start, kv_len=kv_len, backend="triton")
    ref, _ = attention_oracle(q, k, v, causal=True, kv_start=kv_start, kv_len=kv_len)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad.double())
    for name, g, w in zip("qkv", got, want):
        assert max_rel_error(g, w) < 1e-4, f"d{name}"
