"""The Triton backend's own cases, in Triton's interpreter on CPU (and compiled on CUDA).

The op contract's cases (every backend against the float64 oracle) are in ``test_contract.py``; here are what only
Triton has: larger shapes on a GPU, key blocks that must never be loaded, strided inputs, a hypothesis sweep of odd
shapes, its dispatch reasons, the custom op under ``torch.compile`` and ``opcheck``, and its lazy import.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from perceiver_fast.kernels import attention, explain
from perceiver_fast.kernels.triton.backend import TritonBackend
from tests.kernels.test_contract import _inputs, check_against_oracle
from tests.oracle import attention_oracle, max_rel_error, random_bounds

pytest.importorskip("triton")
from perceiver_fast.kernels.triton import config  # noqa: E402  (imports triton)

FP32_TOL = {"out": 1e-5, "lse": 1e-5, "grad": 1e-4}  # grads: ds = p * (dp - delta) cancels where p is near one


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [40, 64, 128, 256])
@pytest.mark.parametrize("shape", [(2, 256, 256, True), (1, 128, 1024, True), (2, 200, 333, False), (2, 3, 4000, True)])
def test_compiled_kernels_on_cuda_at_size(shape, head_dim, dtype):
    if config.interpreting():
        pytest.skip("TRITON_INTERPRET=1 runs the interpreter; set TRITON_INTERPRET=0 for the compiled kernels")
    batch, nq, nk, causal = shape
    check_against_oracle("triton", (batch, nq, nk, 8, 2, head_dim, head_dim, causal), "both", dtype, "cuda")


_TILE_TABLES = ("FORWARD_TILES", "SPLIT_TILES", "DQ_TILES", "DKDV_TILES")


def _every_tile() -> list:
    """Every autotune candidate of every table row: on a GPU the autotuner may pick any of them, while the other GPU
    tests (run with PERCEIVER_FAST_TRITON_AUTOTUNE=0) only ever compile the first of each row."""
    return [
        pytest.param(table, row, tile, id=f"{table}-{row}-{'x'.join(map(str, tile))}")
        for table in _TILE_TABLES
        for row, tiles in getattr(config, table).items()
        for tile in tiles
    ]


@pytest.fixture
def fresh_autotune_choices():
    """Forget the autotuners' choices before and after: a tile forced by a test must not outlive it."""
    from perceiver_fast.kernels.triton import backward, forward

    kernels = (forward._fwd, forward._fwd_split, backward._dq, backward._dkdv)
    for kernel in kernels:
        kernel.cache.clear()
    yield
    for kernel in kernels:
        kernel.cache.clear()


@pytest.mark.gpu
@pytest.mark.parametrize("table, row, tile", _every_tile())
def test_every_autotune_tile_matches_the_oracle_on_cuda(table, row, tile, monkeypatch, fresh_autotune_choices):
    """Each tile a table lists, forced as its row's only candidate, forward and backward (decoding tiles: the
    decoding forward, one query and grouped heads packed), with padded and ragged rows, against the oracle."""
    if config.interpreting():
        pytest.skip("TRITON_INTERPRET=1 runs one fixed tile in the interpreter")
    monkeypatch.setitem(getattr(config, table), row, [tile])
    head_dim = {64: 64, 128: 96, 256: 256, "fp32": 64}[row]  # 96: a padded head dim in the 128 row
    dtype = torch.float32 if row == "fp32" else torch.bfloat16
    if table == "SPLIT_TILES":
        for case in ((3, 1, 700, 8, 8, head_dim, head_dim, True), (3, 4, 700, 8, 2, head_dim, head_dim, True)):
            check_against_oracle("triton", case, "both", dtype, "cuda", grad=False)
    else:  # 200 queries over 520 keys: several query and key blocks, and split key ranges (16 programs)
        check_against_oracle("triton", (2, 200, 520, 4, 2, head_dim, head_dim, True), "both", dtype, "cuda")


def test_skipped_key_blocks_are_never_read():
    """NaN in every key block before kv_start's block or past the causal edge must not reach out or grads."""
    block = config.configs(config.FORWARD_TILES)[0].kwargs["BLOCK_N"]
    batch, nq, nk = 2, 8, 5 * block
    q, k, v = (t.detach() for t in _inputs((batch, nq, nk, 2, 2, 16, 16, True), torch.float32, "cpu"))
    kv_start = torch.tensor([2 * block + 3, block], dtype=torch.int32)
    kv_len = torch.tensor([4 * block - 5, 3 * block], dtype=torch.int32)
    poisoned_k, poisoned_v = k.clone(), v.clone()
    for b in range(batch):
        first = (int(kv_start[b]) // block) * block
        last = -(-int(kv_len[b]) // block) * block  # the causal edge of the last query is kv_len - 1
        for t in (poisoned_k, poisoned_v):
            t[b, :first] = float("nan")
            t[b, last:] = float("nan")
    q.requires_grad_()
    poisoned_k.requires_grad_()
    poisoned_v.requires_grad_()
    out = attention(q, poisoned_k, poisoned_v, causal=True, kv_start=kv_start, kv_len=kv_len, backend="triton")
    ref, _ = attention_oracle(q, k, v, causal=True, kv_start=kv_start, kv_len=kv_len)
    assert max_rel_error(out, ref) < 1e-5
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, poisoned_k, poisoned_v))


def test_non_contiguous_inputs_and_gradient():
    packed = torch.randn(2, 40, 2, 3, 24)  # a fused qkv projection viewed as [B, N, H, 3, D]
    q, k = packed[..., 0, :], packed[..., 1, :]
    v = packed[..., 2, :].transpose(1, 2).contiguous().transpose(1, 2)  # [B, H, N, D] memory, [B, N, H, D] view
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    assert not any(t.is_contiguous() for t in (q, k, v))
    out = attention(q, k, v, causal=True, backend="triton")
    ref, _ = attention_oracle(q, k, v, causal=True)
    assert max_rel_error(out, ref) < 1e-5
    grad = torch.randn(2, 2, 40, 24).transpose(1, 2)  # a non-contiguous incoming gradient
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad.double())
    for name, g, w in zip("qkv", got, want):
        assert max_rel_error(g, w) < FP32_TOL["grad"], f"d{name}"


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 2),
    nq=st.integers(1, 40),
    nk=st.integers(1, 48),
    heads=st.sampled_from([(1, 1), (2, 1), (3, 3), (4, 2)]),
    dims=st.sampled_from([(16, 16), (8, 20), (33, 17), (64, 40)]),
    causal=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_shape_sweep(batch, nq, nk, heads, dims, causal, seed):
    generator = torch.Generator().manual_seed(seed)
    case = (batch, nq, nk, *heads, *dims, causal)
    q, k, v = _inputs(case, torch.float32, "cpu", generator)
    kv_start, kv_len = random_bounds(batch, nk, generator=generator, allow_empty=True)
    kwargs = dict(causal=causal, kv_start=kv_start, kv_len=kv_len)
    out, lse = attention(q, k, v, return_lse=True, backend="triton", **kwargs)
    ref, ref_lse = attention_oracle(q, k, v, **kwargs)
    assert max_rel_error(out, ref) < 1e-5
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], rtol=1e-5, atol=1e-5)
    grad = torch.randn(out.shape, generator=generator)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad.double())
    for name, g, w in zip("qkv", got, want):
        assert max_rel_error(g, w) < FP32_TOL["grad"], f"d{name}"


def test_explain_reports_triton_and_eager_decisions(monkeypatch):
    q, k, v = _inputs((1, 4, 6, 2, 1, 16, 16, True), torch.float32, "cpu")
    auto = explain(q, k, v, causal=True)
    assert auto.backend == "eager"
    assert "ask with backend='triton'" in auto.passed_over["triton"]
    assert explain(q, k, v, causal=True, backend="triton").backend == "triton"
    monkeypatch.setenv("PERCEIVER_FAST_BACKEND", "triton")
    assert explain(q, k, v).backend == "triton"
    with pytest.raises(RuntimeError, match="dropout_p > 0"):
        attention(q, k, v, dropout_p=0.1)
    wide = torch.randn(1, 4, 1, 272)
    with pytest.raises(RuntimeError, match="head dim 272"):
        attention(wide, wide, wide)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        attention(q, k, v)


def test_backend_reasons_for_devices_and_dtypes(monkeypatch):
    base = dict(
        batch=1, num_queries=4, num_keys=4, num_q_heads=1, num_kv_heads=1, qk_head_dim=16, v_head_dim=16,
        causal=False, has_kv_start=False, has_kv_len=False, dropout_p=0.0, requires_grad=False, return_lse=False,
    )  # fmt: skip
    from perceiver_fast.kernels.problem import AttentionProblem

    backend = TritonBackend()
    meta = AttentionProblem(device=torch.device("meta"), dtype=torch.float32, **base)
    assert "meta tensors" in backend.unsupported_reason(meta)
    cuda = AttentionProblem(device=torch.device("cuda"), dtype=torch.float32, **base)
    assert "TRITON_INTERPRET=1 is set" in backend.unsupported_reason(cuda)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # reasons that come before any CUDA call
    double = AttentionProblem(device=torch.device("cuda"), dtype=torch.float64, **base)
    assert "float64" in backend.unsupported_reason(double)
    dropout = AttentionProblem(device=torch.device("cuda"), dtype=torch.float16, **{**base, "dropout_p": 0.1})
    assert "dropout_p > 0" in backend.unsupported_reason(dropout)


def test_compiles_fullgraph_through_the_custom_op():
    """``torch.compile(fullgraph=True)`` traces the op through its fake implementation and autograd formula."""
    from perceiver_fast.kernels.triton.op import triton_attention

    def f(q, k, v, kv_start):
        return triton_attention(q, k, v, causal=True, kv_start=kv_start, kv_len=None, scale=0.3)[0]

    q, k, v = _inputs((2, 9, 20, 4, 2, 16, 24, True), torch.float32, "cpu")
    kv_start = torch.tensor([0, 7], dtype=torch.int32)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v, kv_start)
    ref, _ = attention_oracle(q, k, v, causal=True, kv_start=kv_start, scale=0.3)
    assert max_rel_error(out, ref) < 1e-5
    got = torch.autograd.grad(out.sum(), (q, k, v))
    want = torch.autograd.grad(ref.sum(), (q, k, v))
    for name, g, w in zip("qkv", got, want):
        assert max_rel_error(g, w) < FP32_TOL["grad"], f"d{name}"


@pytest.mark.parametrize("grouped", [False, True])
def test_eager_calls_skip_the_custom_ops_and_equal_them(grouped, monkeypatch):
    """Plain eager calls launch the kernels without the registered ops (whose dispatch costs more host time than
    SDPA's whole call), forward and backward, and give bit for bit what the ops give."""
    from perceiver_fast.kernels.triton import op

    q, k, v = _inputs((3, 6, 11, 4, 2 if grouped else 4, 16, 24, True), torch.float32, "cpu")
    kv_start = torch.tensor([0, 2, 5], dtype=torch.int32)
    kv_len = torch.tensor([11, 9, 5], dtype=torch.int32)  # the last row sees one key, some queries none
    grad_out = torch.randn(3, 6, 4, 24)
    want_out, want_lse = op._attention_fwd(q, k, v, kv_start, kv_len, True, 0.3)
    want_grads = torch.autograd.grad(want_out, (q, k, v), grad_out)

    def refuse(*args):
        raise AssertionError("went through the custom op")

    monkeypatch.setattr(op, "_attention_fwd", refuse)
    monkeypatch.setattr(op, "_attention_bwd", refuse)
    out, lse = op.triton_attention(q, k, v, causal=True, kv_start=kv_start, kv_len=kv_len, scale=0.3)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    for name, got, want in zip("qkv", grads, want_grads):
        assert torch.equal(got, want), f"d{name}"
    assert not lse.requires_grad
    with torch.no_grad():
        no_grad_out, _ = op.triton_attention(q, k, v, causal=True, kv_start=kv_start, kv_len=kv_len, scale=0.3)
    assert torch.equal(no_grad_out, out)


def test_intercepted_calls_go_through_the_custom_op():
    """A dispatch mode (profilers, debug modes) sees the op, not the kernels' launches, and under FakeTensorMode (as
    when torch.compile or export traces) the op's fake implementation answers."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    from perceiver_fast.kernels.triton.op import triton_attention

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    q, k, v = (t.detach() for t in _inputs((2, 5, 9, 2, 2, 16, 24, True), torch.float32, "cpu"))
    with Record() as record:
        triton_attention(q, k, v, causal=True, kv_start=None, kv_len=None, scale=0.25)
    assert "perceiver_fast.triton_attention_fwd.default" in record.ops
    with FakeTensorMode() as mode:
        fake_q, fake_k, fake_v = (mode.from_tensor(t) for t in (q, k, v))
        out, lse = triton_attention(fake_q, fake_k, fake_v, causal=True, kv_start=None, kv_len=None, scale=0.25)
    assert out.shape == (2, 5, 2, 24) and lse.shape == (2, 2, 5)


def test_eager_calls_raise_where_a_second_derivative_is_asked(monkeypatch):
    """A gradient penalty (create_graph=True) needs the attention's second derivative, which neither path has: the
    eager path must raise as the op path does, not drop the term and return a wrong gradient."""
    from perceiver_fast.kernels.triton import op

    x = torch.randn(2, 6, 32, requires_grad=True)
    weights = [torch.randn(32, 32, requires_grad=True) for _ in range(3)]
    q, k, v = ((x @ w).view(2, 6, 2, 16) for w in weights)
    monkeypatch.setattr(op, "_attention_fwd", lambda *args: pytest.fail("went through the custom op"))
    out, _ = op.triton_attention(q, k, v, causal=True, kv_start=None, kv_len=None, scale=0.25)
    (grad_x,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        torch.autograd.grad(grad_x.square().sum(), weights)


def test_eager_calls_take_batched_gradients_and_jit_traces():
    """Batched gradients vmap the backward, and torch.jit.trace records ops: both get the registered ops."""
    from perceiver_fast.kernels.triton.op import triton_attention

    q, k, v = _inputs((2, 5, 9, 2, 2, 16, 16, True), torch.float32, "cpu")
    out, _ = triton_attention(q, k, v, causal=True, kv_start=None, kv_len=None, scale=0.25)
    cotangents = torch.randn(3, *out.shape)
    batched = torch.autograd.grad(out, (q, k, v), cotangents, is_grads_batched=True, retain_graph=True)
    for i in range(3):
        one = torch.autograd.grad(out, (q, k, v), cotangents[i], retain_graph=True)
        for got, want in zip(batched, one):
            assert torch.allclose(got[i], want, rtol=1e-5, atol=1e-6)

    def f(q, k, v):
        return triton_attention(q, k, v, causal=True, kv_start=None, kv_len=None, scale=0.25)[0]

    detached = [t.detach() for t in (q, k, v)]
    traced = torch.jit.trace(f, detached, check_trace=False)
    assert "perceiver_fast::triton_attention_fwd" in str(traced.graph)
    fresh = [torch.randn_like(t) for t in detached]
    assert torch.equal(traced(*fresh), f(*fresh))


def test_host_launch_arithmetic_equals_tritons():
    """The launch code's own cdiv/next_power_of_2 (Triton's are constexpr functions, slow to call from the host)."""
    import triton

    for n in range(0, 300):
        assert config.next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 16, 64, 128):
            assert config.cdiv(n, d) == triton.cdiv(n, d), (n, d)
    assert config.next_power_of_2(2**31 + 1) == 2**32


def test_custom_op_passes_opcheck():
    from perceiver_fast.kernels.triton.op import _attention_fwd

    q, k, v = _inputs((2, 5, 9, 2, 1, 16, 8, True), torch.float32, "cpu")
    bounds = (torch.tensor([0, 3], dtype=torch.int32), torch.tensor([9, 7], dtype=torch.int32))
    torch.library.opcheck(_attention_fwd, (q, k, v, *bounds, True, 0.25))


def test_backend_import_and_cpu_dispatch_do_not_import_triton():
    """Registration and CPU calls under ``auto`` must work on machines without Triton: check in a fresh process."""
    import subprocess
    import sys

    code = (
        "import sys, torch; import perceiver_fast.kernels as K; "
        "assert 'triton' in K.available_backends(); "
        "x = torch.randn(1, 2, 1, 8); K.attention(x, x, x); d = K.explain(x, x, x); "
        "assert d.backend == 'eager' and 'TRITON_INTERPRET=1' in d.passed_over['triton'], d; "
        "assert 'triton' not in sys.modules, 'imported eagerly'"
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
