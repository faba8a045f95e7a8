"""The op contract on the eager backend, against the float64 oracle, plus argument checks and dispatch."""

import pytest
import torch

from perceiver_fast.kernels import attention, available_backends, explain
from tests.oracle import attention_oracle, max_rel_error, random_bounds

CASES = [
    # (batch, num_queries, num_keys, q heads, kv heads, qk dim, v dim, causal)
    (2, 7, 7, 4, 4, 16, 16, True),  # causal self-attention
    (3, 5, 19, 4, 2, 24, 40, True),  # prefix-causal, grouped heads, Dqk != Dv
    (2, 1, 13, 6, 3, 40, 40, True),  # one decode query
    (2, 9, 21, 2, 1, 80, 64, False),  # non-causal cross-attention, multi-query
    (1, 11, 6, 2, 2, 16, 16, True),  # more queries than keys: the first rows see nothing
]


def _inputs(batch, nq, nk, hq, hkv, dqk, dv, dtype=torch.float32):
    q = torch.randn(batch, nq, hq, dqk, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, nk, hkv, dqk, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, nk, hkv, dv, dtype=dtype, requires_grad=True)
    return q, k, v


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("bounds", ["none", "ragged", "padded", "both"])
def test_eager_matches_oracle_fp32(case, bounds):
    batch, nq, nk, hq, hkv, dqk, dv, causal = case
    q, k, v = _inputs(batch, nq, nk, hq, hkv, dqk, dv)
    kv_start, kv_len = random_bounds(
        batch, nk, ragged=bounds in ("ragged", "both"), padded=bounds in ("padded", "both"), allow_empty=True
    )
    out, lse = attention(
        q, k, v, causal=causal, kv_start=kv_start, kv_len=kv_len, return_lse=True, backend="eager"
    )
    ref, ref_lse = attention_oracle(q, k, v, causal=causal, kv_start=kv_start, kv_len=kv_len)
    assert out.shape == (batch, nq, hq, dv) and out.dtype == torch.float32
    assert max_rel_error(out, ref) < 1e-5
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], rtol=1e-5, atol=1e-5)

    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad.double())
    for name, g, w in zip("qkv", got, want):
        assert torch.isfinite(g).all(), name
        assert max_rel_error(g, w) < 1e-5, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES[:3])
def test_eager_low_precision_within_twice_its_own_rounding(dtype, case):
    """flash-attn's rule: our error vs float64 at most twice that of a plain fp32-softmax run in the same dtype."""
    batch, nq, nk, hq, hkv, dqk, dv, causal = case
    q, k, v = _inputs(batch, nq, nk, hq, hkv, dqk, dv, dtype=dtype)
    kv_start, kv_len = random_bounds(batch, nk)
    out = attention(q, k, v, causal=causal, kv_start=kv_start, kv_len=kv_len, backend="eager")
    ref, _ = attention_oracle(q, k, v, causal=causal, kv_start=kv_start, kv_len=kv_len)
    rounded_ref = ref.to(dtype)  # the best any kernel can do in this dtype
    assert out.dtype == dtype
    err = (out.double() - ref).abs().max()
    assert err <= 2 * (rounded_ref.double() - ref).abs().max() + 2e-3

    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), grad.to(dtype))
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for name, g, w in zip("qkv", got, want):
        assert g.dtype == dtype and torch.isfinite(g).all(), name
        assert max_rel_error(g, w) < 3e-2, name


def test_fully_masked_rows_are_zero_with_zero_gradients():
    q, k, v = _inputs(2, 4, 6, 2, 2, 16, 16)
    kv_start = torch.tensor([6, 2], dtype=torch.int32)  # row 0 sees nothing at all
    out, lse = attention(q, k, v, causal=True, kv_start=kv_start, return_lse=True)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.isneginf(lse[0]).all()
    out.sum().backward()
    assert torch.equal(q.grad[0], torch.zeros_like(q.grad[0]))
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_non_contiguous_inputs():
    packed = torch.randn(2, 8, 2, 3, 16)  # a fused qkv projection viewed as [B, N, H, 3, D]
    q, k = packed[..., 0, :], packed[..., 1, :]
    v = packed[..., 2, :].transpose(1, 2).contiguous().transpose(1, 2)  # [B, H, N, D] memory, [B, N, H, D] view
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    out = attention(q, k, v, causal=True)
    ref, _ = attention_oracle(q, k, v, causal=True)
    assert max_rel_error(out, ref) < 1e-5


def test_scale_and_dropout_arguments():
    q, k, v = _inputs(1, 3, 5, 2, 2, 8, 8)
    out = attention(q, k, v, scale=0.1)
    ref, _ = attention_oracle(q, k, v, scale=0.1)
    assert max_rel_error(out, ref) < 1e-5
    dropped = attention(q, k, v, dropout_p=0.5)
    assert not torch.allclose(dropped, out)


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda q, k, v: (q[0], k, v), ValueError, "q must have shape"),
        (lambda q, k, v: (q.double(), k, v), TypeError, "q has dtype"),
        (lambda q, k, v: (q, k.half(), v), TypeError, "share a dtype"),
        (lambda q, k, v: (q, k[:1], v), ValueError, "batch sizes"),
        (lambda q, k, v: (q, k, v[:, :3]), ValueError, "must agree"),
        (lambda q, k, v: (q[..., :8], k, v), ValueError, "head dims differ"),
        (lambda q, k, v: (q[:, :, :3], k, v), ValueError, "multiple of"),
        (lambda q, k, v: (q[:, :0], k, v), ValueError, "empty"),
        (lambda q, k, v: ("q", k, v), TypeError, "torch.Tensor"),
    ],
)
def test_bad_tensors_raise(mutate, error, match):
    q, k, v = _inputs(2, 4, 6, 4, 2, 16, 16)
    with pytest.raises(error, match=match):
        attention(*mutate(q, k, v))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"kv_len": torch.tensor([3, 7], dtype=torch.int32)}, ValueError, "kv_len values"),
        ({"kv_len": torch.tensor([3, -1], dtype=torch.int32)}, ValueError, "kv_len values"),
        ({"kv_start": torch.tensor([4, 0], dtype=torch.int32), "kv_len": torch.tensor([3, 6])}, ValueError, "kv_start"),
        ({"kv_start": torch.tensor([0.0, 1.0])}, TypeError, "integer"),
        ({"kv_len": torch.tensor([1, 2, 3], dtype=torch.int32)}, ValueError, "shape"),
        ({"kv_len": [1, 2]}, TypeError, "kv_len"),
        ({"dropout_p": 1.0}, ValueError, "dropout_p"),
        ({"scale": "x"}, TypeError, "scale"),
        ({"backend": "nope"}, ValueError, "backend='nope'"),
    ],
)
def test_bad_arguments_raise(kwargs, error, match):
    q, k, v = _inputs(2, 4, 6, 4, 2, 16, 16)
    with pytest.raises(error, match=match):
        attention(q, k, v, **kwargs)


def test_explain_names_the_backend_and_env_var(monkeypatch):
    q, k, v = _inputs(1, 2, 3, 1, 1, 8, 8)
    decision = explain(q, k, v, causal=True)
    assert decision.backend in available_backends()
    assert "eager" in available_backends()
    assert f"backend: {decision.backend}" in str(decision)
    monkeypatch.setenv("PERCEIVER_FAST_BACKEND", "eager")
    assert explain(q, k, v).backend == "eager"
    monkeypatch.setenv("PERCEIVER_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="PERCEIVER_FAST_BACKEND"):
        attention(q, k, v)


def test_compiles_without_graph_breaks():
    def f(q, k, v, kv_start):
        return attention(q, k, v, causal=True, kv_start=kv_start, backend="eager")

    q, k, v = _inputs(2, 3, 5, 2, 1, 8, 8)
    kv_start = torch.tensor([0, 2], dtype=torch.int32)
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, k, v, kv_start), f(q, k, v, kv_start))
