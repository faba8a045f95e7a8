"""The CUDA C++ kernels on a GPU against the float64 oracle (marked ``gpu``: skipped without a device).

Needs the library built (``PERCEIVER_FAST_BUILD_CUDA=1``, see csrc/build.py); without it the tests skip with the
recorded reason, or fail when ``PERCEIVER_FAST_REQUIRE_CUDA_EXT=1`` (benchmarks/gpu_check_cuda.sh sets it, so a
broken build is not mistaken for a pass).
"""

from __future__ import annotations

import os

import pytest
import torch

from perceiver_fast.kernels import attention, cuda, explain
from tests.oracle import attention_oracle, random_bounds

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _library():
    missing = cuda.library_status()
    if missing is not None:
        if os.environ.get("PERCEIVER_FAST_REQUIRE_CUDA_EXT") == "1":
            pytest.fail(missing)
        pytest.skip(missing)


def _within_rounding(out, ref, dtype, atol=2e-3):
    """flash-attn's rule: error vs float64 at most twice that of rounding the exact result to ``dtype``."""
    rounding = (ref.to(dtype).double() - ref).abs().max()
    err = (out.double() - ref).abs().max()
    assert err <= 2 * rounding + atol, f"max error {err:.3g} vs rounding {rounding:.3g}"


def _check(out, lse, ref, ref_lse, dtype):
    assert out.dtype == dtype and torch.isfinite(out).all()
    _within_rounding(out, ref, dtype)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isneginf(lse), ~finite)
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], rtol=1e-3, atol=1e-3)


CASES = [
    # (batch, Nq, Nk, Hq, Hkv, Dqk, Dv, causal)
    (2, 128, 128, 4, 4, 64, 64, True),  # causal self-attention
    (2, 100, 700, 8, 2, 40, 72, True),  # prefix-causal, grouped heads, odd dims
    (3, 1, 513, 8, 1, 128, 128, True),  # decode, multi-query
    (1, 77, 300, 2, 2, 32, 16, False),  # non-causal cross-attention
    (2, 90, 40, 2, 1, 64, 64, True),  # more queries than keys: leading rows see nothing
    (1, 1024, 1280, 16, 16, 64, 64, True),  # Perceiver AR shape
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("bounds", ["none", "ragged+padded"])
def test_matches_oracle(dtype, case, bounds):
    batch, nq, nk, hq, hkv, dqk, dv, causal = case
    q = torch.randn(batch, nq, hq, dqk, device="cuda", dtype=dtype)
    k = torch.randn(batch, nk, hkv, dqk, device="cuda", dtype=dtype)
    v = torch.randn(batch, nk, hkv, dv, device="cuda", dtype=dtype)
    kv_start = kv_len = None
    if bounds != "none":
        kv_start, kv_len = (t.cuda() for t in random_bounds(batch, nk, allow_empty=True))
    out, lse = attention(q, k, v, causal=causal, kv_start=kv_start, kv_len=kv_len, return_lse=True, backend="cuda")
    ref, ref_lse = attention_oracle(q, k, v, causal=causal, kv_start=kv_start, kv_len=kv_len)
    _check(out, lse, ref, ref_lse, dtype)


@pytest.mark.parametrize("num_splits", [1, 2, 7, 32])
def test_split_kv_decode_over_a_cache_with_garbage_past_its_length(num_splits):
    """Preallocated cache: keys past kv_len (and before kv_start) hold NaN; they must not leak into the result."""
    batch, nk, hq, hkv, d = 4, 2048, 16, 4, 128
    dtype = torch.bfloat16
    q = torch.randn(batch, 2, hq, d, device="cuda", dtype=dtype)
    k = torch.full((batch, nk, hkv, d), float("nan"), device="cuda", dtype=dtype)
    v = torch.full((batch, nk, hkv, d), float("nan"), device="cuda", dtype=dtype)
    kv_start = torch.tensor([0, 5, 100, 0], device="cuda", dtype=torch.int32)
    kv_len = torch.tensor([1, 700, 2048, 1500], device="cuda", dtype=torch.int32)
    for b in range(batch):
        lo, hi = int(kv_start[b]), int(kv_len[b])
        k[b, lo:hi] = torch.randn(hi - lo, hkv, d, device="cuda", dtype=dtype)
        v[b, lo:hi] = torch.randn(hi - lo, hkv, d, device="cuda", dtype=dtype)
    out, lse = cuda.cuda_attention(
        q, k, v, causal=True, kv_start=kv_start, kv_len=kv_len, scale=d**-0.5, num_splits=num_splits
    )
    ref, ref_lse = attention_oracle(
        q, k.nan_to_num(0.0), v.nan_to_num(0.0), causal=True, kv_start=kv_start, kv_len=kv_len
    )
    _check(out, lse, ref, ref_lse, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dims", [(64, 64), (128, 96), (36, 100)], ids=lambda d: f"{d[0]}-{d[1]}")
@pytest.mark.parametrize("aligned", [True, False], ids=["cp.async", "64-row"])
def test_both_forward_kernels_on_one_shape(dtype, head_dims, aligned):
    """The same problem through the cp.async/ldmatrix kernel (rows 16-byte aligned, also as views of padded rows)
    and through the 64-row kernel (rows that are not): causal prefix, grouped heads, ragged padded bounds."""
    dqk, dv = head_dims
    batch, nq, nk, hq, hkv = 3, 200, 900, 8, 2

    def make(n, h, d):
        width = (d + 7) // 8 * 8 if aligned else d + 1  # a padded row; d + 1 breaks the 16-byte alignment
        return torch.randn(batch, n, h, width, device="cuda", dtype=dtype)[..., :d]

    q, k, v = make(nq, hq, dqk), make(nk, hkv, dqk), make(nk, hkv, dv)
    assert cuda.block_rows(dqk, dv, aligned=cuda._rows_aligned(q, k, v)) == (128 if aligned else 64)
    kv_start, kv_len = (t.cuda() for t in random_bounds(batch, nk, allow_empty=True))
    out, lse = attention(q, k, v, causal=True, kv_start=kv_start, kv_len=kv_len, return_lse=True, backend="cuda")
    ref, ref_lse = attention_oracle(q, k, v, causal=True, kv_start=kv_start, kv_len=kv_len)
    _check(out, lse, ref, ref_lse, dtype)


def test_strided_views_of_a_packed_projection():
    batch, n, h, d = 2, 200, 4, 64
    qkv = torch.randn(batch, n, 3, h, d, device="cuda", dtype=torch.float16)
    q, k, v = qkv.unbind(dim=2)
    out, lse = attention(q, k, v, causal=True, return_lse=True, backend="cuda")
    ref, ref_lse = attention_oracle(q, k, v, causal=True)
    _check(out, lse, ref, ref_lse, torch.float16)


def test_gradients_and_fp32_fall_back():
    q = torch.randn(1, 16, 2, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert "forward-only" in explain(q, q, q).passed_over["cuda"]
    with torch.no_grad():
        assert explain(q, q, q, backend="cuda").backend == "cuda"
    assert "float16/bfloat16 only" in explain(q.float(), q.float(), q.float()).passed_over["cuda"]


def test_compiles_without_graph_breaks():
    q = torch.randn(2, 64, 4, 64, device="cuda", dtype=torch.bfloat16)
    bounds = torch.tensor([64, 40], device="cuda", dtype=torch.int32)

    def f(q):
        out, _ = torch.ops.perceiver_fast.cuda_attention_fwd(q, q, q, bounds * 0, bounds, True, 0.125, 2)
        return out * 2

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(q), f(q))


@pytest.mark.parametrize(
    "k_shape, v_shape, message",
    [
        ((2, 64, 2, 32), (2, 16, 2, 32), "v must be"),  # fewer values than keys
        ((2, 64, 2, 32), (2, 64, 1, 32), "v must be"),  # fewer value heads
        ((2, 64, 2, 16), (2, 64, 2, 32), "k must be"),  # q and k head dims differ
    ],
)
def test_the_op_refuses_keys_and_values_that_disagree_instead_of_reading_past_them(k_shape, v_shape, message):
    """``cuda_attention`` takes validated arguments; the op itself still checks every size it reads (the kernels
    take Nk and Hkv from k, Dv and strides from v), as its decode op does."""
    q = torch.randn(2, 8, 4, 32, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(k_shape, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(v_shape, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=message):
        cuda.cuda_attention(q, k, v, causal=False, kv_start=None, kv_len=None, scale=0.2)
        torch.cuda.synchronize()
