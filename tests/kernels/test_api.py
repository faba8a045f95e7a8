"""The op's entry point: argument checks (before any kernel runs), the value checks that read no GPU data, the
eager path's own shortcuts, and what explain() says. The contract's numerics on every backend are in
``test_contract.py``."""

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from perceiver_fast.kernels import api, attention, available_backends, explain
from tests.oracle import attention_oracle, max_rel_error


def _inputs(batch, nq, nk, hq, hkv, dqk, dv, dtype=torch.float32):
    q = torch.randn(batch, nq, hq, dqk, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, nk, hkv, dqk, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, nk, hkv, dv, dtype=dtype, requires_grad=True)
    return q, k, v


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
        (lambda q, k, v: (q.int(), k, v), TypeError, "q has dtype .*float64"),  # float64 is supported (eager)
        (lambda q, k, v: (q, k.half(), v), TypeError, "share a dtype"),
        (lambda q, k, v: (q, k[:1], v), ValueError, "batch sizes"),
        (lambda q, k, v: (q, k, v[:, :3]), ValueError, "must agree"),
        (lambda q, k, v: (q[..., :8], k, v), ValueError, "head dims differ"),
        (lambda q, k, v: (q[:, :, :3], k, v), ValueError, "multiple of"),
        (lambda q, k, v: (q[:, :0], k, v), ValueError, "empty"),
        (lambda q, k, v: (q[:, :, :0], k, v), ValueError, "empty"),  # no q heads: a kernel's grid would be empty
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
        ({"dropout_p": None}, TypeError, "dropout_p must be a float"),
        ({"dropout_p": "0.1"}, TypeError, "dropout_p must be a float"),
        ({"scale": "x"}, TypeError, "scale"),
        ({"scale": True}, TypeError, "scale"),
        ({"scale": float("nan")}, ValueError, "scale must be finite"),
        ({"scale": float("inf")}, ValueError, "scale must be finite"),
        ({"causal": "yes"}, TypeError, "causal must be a bool"),
        ({"backend": "nope"}, ValueError, "backend='nope'"),
        # int64 values are checked before they are narrowed to int32, where they would wrap
        ({"kv_len": torch.tensor([2**32 + 3, 6])}, ValueError, "4294967299"),
        ({"kv_start": torch.tensor([-(2**32), 0])}, ValueError, "-4294967296"),
        ({"kv_start": torch.tensor([2**31, 0])}, ValueError, "2147483648"),
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


def _graph_ops(fn, *args) -> set[str]:
    """The ops of the graph ``torch.compile`` traces from ``fn(*args)``."""
    ops = set()

    def backend(gm, example_inputs):
        ops.update(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm

    torch.compile(fn, fullgraph=True, backend=backend)(*args)
    return ops


@pytest.mark.parametrize("return_lse", [False, True])
def test_traced_without_gradients_on_cpu_the_reference_is_one_opaque_op(return_lse):
    """Traced, the reference cannot read key bounds to narrow the keys: it would zero every key outside them (a pass
    over a whole decoding cache). Without gradients on the CPU it runs as one op that reads them at run time."""
    torch.manual_seed(0)
    q, k, v = (t.detach() for t in _inputs(2, 3, 40, 4, 2, 8, 6))
    kv_start, kv_len = torch.tensor([5, 0], dtype=torch.int32), torch.tensor([30, 40], dtype=torch.int32)

    def f(q, k, v):
        return attention(q, k, v, causal=True, kv_start=kv_start, kv_len=kv_len, return_lse=return_lse)

    with torch.no_grad():
        assert "perceiver_fast.eager_attention_cpu.default" in _graph_ops(f, q, k, v)
        expected = f(q, k, v)
        got = torch.compile(f, fullgraph=True)(q, k, v)
    for ours, theirs in zip(got if return_lse else [got], expected if return_lse else [expected]):
        torch.testing.assert_close(ours, theirs)
    ref_out, ref_lse = attention_oracle(q, k, v, causal=True, kv_start=kv_start, kv_len=kv_len)
    assert max_rel_error(got[0] if return_lse else got, ref_out) < 1e-5


def test_traced_with_gradients_the_reference_stays_differentiable():
    """With gradients the reference is traced op by op (the opaque op has no backward)."""
    torch.manual_seed(0)
    q, k, v = _inputs(1, 3, 9, 2, 2, 8, 8)
    kv_len = torch.tensor([7], dtype=torch.int32)

    def f(q, k, v):
        return attention(q, k, v, causal=True, kv_len=kv_len)

    assert "perceiver_fast.eager_attention_cpu.default" not in _graph_ops(f, q, k, v)
    torch.compile(f, fullgraph=True)(q, k, v).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    f(q, k, v).sum().backward()
    for got, expected in zip(grads, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("bounds", [False, True])
def test_the_opaque_reference_op_passes_opcheck(bounds):
    from perceiver_fast.kernels.reference import _eager_attention_cpu

    kv_start, kv_len = (torch.tensor([1, 0], dtype=torch.int32), torch.tensor([8, 9], dtype=torch.int32))
    bound_args = (kv_start, kv_len) if bounds else (None, None)
    for dtype in (torch.float32, torch.float64):
        q, k, v = (t.detach() for t in _inputs(2, 3, 9, 2, 2, 8, 8, dtype=dtype))
        for return_lse in (False, True):
            torch.library.opcheck(_eager_attention_cpu, (q, k, v, *bound_args, True, 0.3, return_lse))


def test_compiles_without_graph_breaks_when_the_head_counts_change():
    """A recompilation with dynamic shapes makes the head counts symbolic: what the op passes on must stay a bool."""
    compiled = torch.compile(lambda q, k, v: attention(q, k, v, backend="eager"), fullgraph=True, backend="aot_eager")
    for num_q_heads in (2, 4, 6):
        q, k, v = _inputs(1, 3, 5, num_q_heads, 2, 8, 8)
        ref, _ = attention_oracle(q, k, v)
        assert max_rel_error(compiled(q, k, v), ref) < 1e-5


@pytest.mark.parametrize("num_keys", [None, 20], ids=["causal", "prefix-causal"])
@pytest.mark.parametrize("forward_only", [False, True], ids=["grad", "no_grad"])
def test_compiles_without_graph_breaks_when_the_sequence_length_changes(num_keys, forward_only):
    """The second length recompiles with dynamic shapes: whether a call is causal past one query is symbolic then,
    and SDPA's causal flag must stay a bool (forward-only prefix-causal calls trace their two-part path)."""
    compiled = torch.compile(
        lambda q, k, v: attention(q, k, v, causal=True, backend="eager"), fullgraph=True, backend="aot_eager"
    )
    for num_queries in (8, 12, 14):
        q, k, v = _inputs(1, num_queries, num_keys or num_queries, 2, 2, 8, 8)
        ref, _ = attention_oracle(q, k, v, causal=True)
        with torch.set_grad_enabled(not forward_only):
            assert max_rel_error(compiled(q, k, v), ref) < 1e-5


@pytest.mark.parametrize("num_keys", [6, 10], ids=["causal", "prefix-causal"])
def test_autocast_gives_its_dtype_with_or_without_gradients(num_keys):
    """The forward-only two-part path calls an aten kernel autocast does not cast: it stands aside under autocast."""
    q, k, v = _inputs(1, 6, num_keys, 2, 2, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with_grad = attention(q, k, v, causal=True)
        with torch.no_grad():
            without = attention(q, k, v, causal=True)
    assert with_grad.dtype == without.dtype == torch.bfloat16
    torch.testing.assert_close(without, with_grad.detach())


@pytest.mark.parametrize("dynamic", [None, True])
def test_compiles_with_a_scale_that_changes_or_is_symbolic(dynamic):
    compiled = torch.compile(
        lambda q, scale: attention(q, q, q, scale=scale, backend="eager"), fullgraph=True, dynamic=dynamic
    )
    q, _, _ = _inputs(1, 3, 3, 2, 2, 8, 8)
    for scale in (0.5, 0.25):
        ref, _ = attention_oracle(q, q, q, scale=scale)
        assert max_rel_error(compiled(q, scale), ref) < 1e-5
    with pytest.raises(Exception, match="scale must be a float or None, got bool"):  # its type is still checked
        compiled(q, True)


def test_the_first_call_of_a_process_may_be_a_compiled_one():
    """A model compiled before it ever ran: the op's first call is traced, and tracing cannot import the backends."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from perceiver_fast.kernels import attention\n"
        "f = torch.compile(lambda q: attention(q, q, q, causal=True), fullgraph=True, backend='eager')\n"
        "print(f(torch.randn(1, 4, 2, 8)).shape)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("scale", [0.0, -0.5])
@pytest.mark.parametrize("num_keys", [6, 10], ids=["causal", "prefix-causal"])
@pytest.mark.parametrize("forward_only", [False, True], ids=["grad", "no_grad"])
def test_a_scale_of_zero_or_below_is_exact_under_a_causal_mask(scale, num_keys, forward_only):
    """SDPA's CPU flash kernel gives NaN under its own causal flag when the scale is not positive."""
    q, k, v = _inputs(2, 6, num_keys, 2, 2, 8, 8)
    with torch.set_grad_enabled(not forward_only):
        for return_lse in (False, True):
            result = attention(q, k, v, causal=True, scale=scale, return_lse=return_lse, backend="eager")
            out, lse = result if return_lse else (result, None)
            ref, ref_lse = attention_oracle(q, k, v, causal=True, scale=scale)
            assert max_rel_error(out, ref) < 1e-5
            if lse is not None:
                assert torch.allclose(lse.double(), ref_lse, atol=1e-5)


def test_numpy_bools_are_accepted_as_flags():
    q, k, v = _inputs(1, 3, 5, 2, 2, 8, 8)
    out, lse = attention(q, k, v, causal=np.True_, return_lse=np.True_)
    ref, _ = attention_oracle(q, k, v, causal=True)
    assert max_rel_error(out, ref) < 1e-5 and lse.shape == (1, 2, 3)
    with pytest.raises(TypeError, match="causal must be a bool, got str 'yes'"):
        attention(q, k, v, causal="yes")


def test_numpy_scalars_are_accepted_as_scale():
    q, k, v = _inputs(1, 3, 5, 2, 2, 8, 8)
    for scale in (np.float32(0.3), np.float64(0.3), np.int64(1)):
        out = attention(q, k, v, scale=scale)
        ref, _ = attention_oracle(q, k, v, scale=float(scale))
        assert max_rel_error(out, ref) < 1e-5


def test_a_backend_asked_for_by_name_that_cannot_run_raises_even_at_batch_zero():
    """Batch 0 needs no kernel, but asking for one that cannot run the call is still an error (it raised at batch 1
    and silently ran eager at batch 0)."""
    q, k, v = _inputs(0, 3, 5, 2, 2, 8, 8)
    with pytest.raises(RuntimeError, match="'cuda' cannot run this call"):
        attention(q, k, v, backend="cuda")
    assert attention(q, k, v, backend="eager").shape == (0, 3, 2, 8)
    assert explain(q, k, v).decided_by == "batch 0: nothing to compute"


def test_batch_zero_with_bounds():
    q, k, v = _inputs(0, 3, 5, 2, 2, 8, 8)
    bounds = torch.zeros(0, dtype=torch.int32)
    out, lse = attention(q, k, v, causal=True, kv_start=bounds, kv_len=bounds, return_lse=True)
    assert out.shape == (0, 3, 2, 8) and lse.shape == (0, 2, 3)
    assert explain(q, k, v, kv_len=bounds).decided_by.startswith("batch 0")


def test_no_value_is_read_from_meta_or_fake_tensors():
    """Value checks run only where values can be read for free (CPU): the op must run where they cannot."""
    q = torch.empty(2, 3, 2, 8, device="meta")
    bounds = torch.empty(2, dtype=torch.int64, device="meta")
    out, lse = attention(q, q, q, causal=True, kv_start=bounds, kv_len=bounds, return_lse=True)
    assert out.shape == (2, 3, 2, 8) and out.device.type == "meta" and lse.shape == (2, 2, 3)
    with FakeTensorMode():
        q = torch.empty(2, 3, 2, 8)
        kv_len = torch.tensor([2, 3], dtype=torch.int32)
        out = attention(q, q, q, causal=True, kv_start=kv_len * 0, kv_len=kv_len)
        assert out.shape == (2, 3, 2, 8)


def test_values_are_checked_on_cpu_and_under_the_debug_switch(monkeypatch):
    cpu = torch.zeros(2, dtype=torch.int32)
    assert api.checks_values(cpu)
    meta = torch.zeros(2, dtype=torch.int32, device="meta")
    assert not api.checks_values(meta)
    with FakeTensorMode():
        fake = torch.zeros(2, dtype=torch.int32)
        assert not api.checks_values(fake)
        monkeypatch.setenv(api.CHECK_BOUNDS_ENV_VAR, "1")
        fake_cuda = torch.zeros(2, dtype=torch.int32, device="cuda")
        assert api.checks_values(fake_cuda)  # the switch reads (syncs on) real GPU tensors
        monkeypatch.setenv(api.CHECK_BOUNDS_ENV_VAR, "0")
        assert not api.checks_values(fake_cuda)


def test_eager_cuts_a_preallocated_cache_to_its_longest_row():
    """On CPU the bounds are free to read: keys past every row's kv_len are not even part of the computation."""
    q, k, v = _inputs(2, 1, 64, 2, 2, 8, 8)
    kv_len = torch.tensor([10, 12], dtype=torch.int32)
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        calls.append(k.shape[2])
        return original(q, k, v, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        out = attention(q, k, v, causal=True, kv_len=kv_len, backend="eager")
    assert calls == [12]
    ref, _ = attention_oracle(q, k, v, causal=True, kv_len=kv_len)
    assert max_rel_error(out, ref) < 1e-5


@pytest.mark.parametrize("fill", [float("nan"), float("inf")])
@pytest.mark.parametrize("num_keys", [6, 10], ids=["square", "prefix"])
@pytest.mark.parametrize("forward_only", [False, True], ids=["grad", "no_grad"])
def test_eager_keeps_a_causally_hidden_bad_value_out_of_earlier_rows(fill, num_keys, forward_only):
    """A key inside the bounds that the causal mask hides from earlier rows is a real key: a later row that sees a
    non-finite value in it is non-finite, the earlier rows are not (forward-only prefix-causal calls take a path of
    their own)."""
    q, k, v = _inputs(1, 6, num_keys, 2, 2, 8, 8)
    last = num_keys - 1  # the key of the last query's own position
    with torch.set_grad_enabled(not forward_only):
        v = v.detach().clone()
        v[0, last - 1] = fill
        out = attention(q, k, v, causal=True, backend="eager")
        assert torch.isfinite(out[0, :4]).all()
        assert not torch.isfinite(out[0, 4:]).any()
        ref, _ = attention_oracle(q[:, :4], k[:, : last - 1], v[:, : last - 1], causal=True)
        assert max_rel_error(out[:, :4], ref) < 1e-5
        k = k.detach().clone()
        k[0, last] = float("nan")
        out = attention(q, k, v.nan_to_num(0.0, 0.0, 0.0), causal=True, backend="eager")
        assert torch.isfinite(out[0, :5]).all() and torch.isnan(out[0, 5]).all()


@pytest.mark.parametrize("fill", [float("nan"), float("inf")])
@pytest.mark.parametrize("return_lse", [False, True])
def test_eager_keeps_a_causally_hidden_bad_key_out_of_earlier_rows_gradients(fill, return_lse):
    """The rows that do not see a non-finite key get the gradients of attention without it, not NaN."""
    q, k, v = (t.detach().requires_grad_() for t in _inputs(1, 6, 6, 2, 2, 8, 8))
    bad_k = k.detach().clone()
    bad_k[0, 5] = fill
    bad_k.requires_grad_()
    out = attention(q, bad_k, v, causal=True, backend="eager", return_lse=return_lse)
    out = out[0] if return_lse else out
    if return_lse:
        lse = attention(q, bad_k, v, causal=True, backend="eager", return_lse=True)[1]
        assert torch.isfinite(lse[0, :, :5]).all() and torch.isnan(lse[0, :, 5]).all()
    (dq,) = torch.autograd.grad(out[:, :5].sum(), [q])
    ref = attention(q, k, v, causal=True, backend="eager")
    (ref_dq,) = torch.autograd.grad(ref[:, :5].sum(), [q])
    assert torch.isnan(out[0, 5]).all()
    assert max_rel_error(dq[:, :5], ref_dq[:, :5]) < 1e-5
