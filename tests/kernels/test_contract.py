"""The op contract, checked on every registered backend against the float64 oracle.

Each test is parametrized over ``available_backends()`` and over the devices this machine has (CPU here; CUDA when
the ``gpu`` tests run). A backend is held to the contract on every call it says it can run; the calls it passes
over are skipped with its reason (so on this CPU machine only ``eager`` and, in Triton's interpreter, ``triton``
run; on a GPU every SDPA, flash-attn and our own backend does). Each backend's own extra cases live in its own test
file. fp16/bf16 follow flash-attn's rule: our error vs float64 at most twice a low-precision reference's, + atol.
"""

from __future__ import annotations

import functools

import pytest
import torch

from perceiver_fast.kernels import attention, available_backends, explain
from perceiver_fast.kernels.problem import AttentionProblem
from perceiver_fast.kernels.registry import get_backend
from tests.oracle import attention_oracle, max_rel_error, random_bounds

BACKENDS = available_backends()
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]
CASES = [
    # (batch, num_queries, num_keys, q heads, kv heads, qk dim, v dim, causal)
    (2, 40, 40, 2, 2, 64, 64, True),  # causal self-attention over several key blocks
    (2, 24, 70, 4, 2, 40, 40, True),  # prefix-causal (Perceiver AR), grouped heads, head dim 40
    (2, 24, 70, 2, 2, 64, 64, True),  # prefix-causal, the shape SDPA and flash-attn take
    (2, 1, 70, 4, 1, 64, 64, True),  # one decode query over a cache: the split-KV path
    (2, 33, 50, 2, 1, 80, 48, False),  # non-causal cross-attention, Dqk != Dv, head dim 80
    (2, 33, 50, 2, 2, 64, 64, False),  # non-causal cross-attention (Perceiver IO)
    (1, 11, 6, 2, 2, 16, 16, True),  # more queries than keys: the first rows see nothing
    (1, 20, 36, 2, 2, 128, 128, True),  # head dim 128
    (2, 8, 90, 2, 2, 16, 24, False),  # few non-causal queries: split-KV without a causal edge
]
BOUNDS = ["none", "ragged", "padded", "both"]
FP32_TOL = {"out": 1e-5, "lse": 1e-5, "grad": 1e-4}  # grads: ds = p * (dp - delta) cancels where p is near one
# float64 (eager only) is computed in float64 throughout: far below float32's rounding, which would give ~1e-7.
FP64_TOL = {"out": 1e-12, "lse": 1e-12, "grad": 1e-10}


def _inputs(case, dtype, device, generator=None):
    batch, nq, nk, hq, hkv, dqk, dv, _ = case

    def make(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype).requires_grad_()

    return make(batch, nq, hq, dqk), make(batch, nk, hkv, dqk), make(batch, nk, hkv, dv)


def _bounds(batch, nk, kind, device):
    kv_start, kv_len = random_bounds(
        batch, nk, ragged=kind in ("ragged", "both"), padded=kind in ("padded", "both"), allow_empty=True
    )
    return (None if t is None else t.to(device) for t in (kv_start, kv_len))


def _skip_unless_available(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")


def strongest_call(backend, q, k, v, **kwargs) -> tuple[bool, bool]:
    """``(with_grad, with_lse)``: the most the backend accepts for these arguments; skips when it takes none."""
    reasons = []
    for with_grad, with_lse in ((True, True), (True, False), (False, True), (False, False)):
        with torch.set_grad_enabled(with_grad):
            try:
                explain(q, k, v, return_lse=with_lse, backend=backend, **kwargs)
                return with_grad, with_lse
            except RuntimeError as error:
                reasons.append(str(error))
    pytest.skip(reasons[-1])


def strongest_result(backend, q, k, v, **kwargs):
    """``(out, lse or None, with_grad)`` of the most the backend accepts for these arguments (see strongest_call)."""
    with_grad, with_lse = strongest_call(backend, q, k, v, **kwargs)
    with torch.set_grad_enabled(with_grad):
        result = attention(q, k, v, return_lse=with_lse, backend=backend, **kwargs)
    out, lse = result if with_lse else (result, None)
    return out, lse, with_grad


def _low_precision_bound(ours, ref64, lowprec, dtype):
    """flash-attn's rule: 2x the larger of the dtype's own rounding and an eager run in that dtype, + atol."""
    ours, ref64, lowprec = ours.detach(), ref64.detach(), lowprec.detach()
    rounding = (ref64.to(dtype).double() - ref64).abs().max()
    eager = (lowprec.double() - ref64).abs().max()
    atol = 1e-3 if dtype == torch.float16 else 8e-3  # bf16 ulp near 1 is 2**-7; the interpreter truncates
    return float((ours.double() - ref64).abs().max()), float(2 * torch.maximum(rounding, eager) + atol)


def check_against_oracle(backend, case, bounds, dtype, device, grad=True):
    """Run ``backend`` on one case and compare out, lse and grads (as far as it takes them) with the oracle.
    ``grad=False``: inputs that need no gradient (inference), which may take forward-only paths."""
    batch, nq, nk, *_, causal = case
    q, k, v = _inputs(case, dtype, device)
    if not grad:
        q, k, v = (t.detach() for t in (q, k, v))
    kv_start, kv_len = _bounds(batch, nk, bounds, device)
    kwargs = dict(causal=causal, kv_start=kv_start, kv_len=kv_len)
    with_grad, with_lse = strongest_call(backend, q, k, v, **kwargs)
    with_grad = with_grad and grad
    with torch.set_grad_enabled(with_grad):
        result = attention(q, k, v, return_lse=with_lse, backend=backend, **kwargs)
    out, lse = result if with_lse else (result, None)
    # float64 leaves, so that the reference gradients are not rounded back to the input dtype.
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = attention_oracle(q64, k64, v64, **kwargs)
    assert out.dtype == dtype and out.shape == ref.shape
    lse_err = 0.0
    if lse is not None:
        assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert lse.shape == ref_lse.shape
        assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "rows that see nothing must have lse -inf"
        finite = torch.isfinite(ref_lse)
        lse_err = float((lse[finite].double() - ref_lse[finite].detach()).abs().max()) if finite.any() else 0.0
    got = want = ()
    if with_grad:
        cotangent = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), cotangent)
        want = torch.autograd.grad(ref, (q64, k64, v64), cotangent.double())
        for g in got:
            assert g.dtype == dtype and torch.isfinite(g).all()
    if dtype in (torch.float32, torch.float64):
        tol = FP32_TOL if dtype == torch.float32 else FP64_TOL
        assert max_rel_error(out, ref) < tol["out"]
        assert lse_err < tol["lse"]
        for name, g, w in zip("qkv", got, want):
            assert max_rel_error(g, w) < tol["grad"], f"d{name}"
        return
    if grad:
        eager = attention(q, k, v, backend="eager", **kwargs)
    else:  # eager's rounding from its differentiable path: a forward-only call may be the path under test
        eager = attention(q.detach().requires_grad_(), k, v, backend="eager", **kwargs)
    err, bound = _low_precision_bound(out, ref, eager, dtype)
    assert err <= bound, f"out: {err} > {bound}"
    assert lse_err < 1e-2  # the lse is fp32 from low-precision scores
    if with_grad:
        eager_grads = torch.autograd.grad(eager, (q, k, v), cotangent)
        for name, g, w, e in zip("qkv", got, want, eager_grads):
            # Gradients sum many rounded products: judge them relative to their size, against eager's own error.
            scale = float(w.abs().max().clamp(min=0.1))
            err, bound = _low_precision_bound(g / scale, w / scale, e / scale, dtype)
            assert err <= bound, f"d{name}: {err} > {bound}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bounds", BOUNDS)
@pytest.mark.parametrize("case", CASES)
def test_fp32_matches_oracle(case, bounds, device, backend):
    _skip_unless_available(device)
    check_against_oracle(backend, case, bounds, torch.float32, device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bounds", BOUNDS)
@pytest.mark.parametrize("case", CASES)
def test_fp64_matches_oracle_in_fp64(case, bounds, device, backend):
    """float64 runs on the eager backend (for gradcheck and float64 references), forward, lse and backward in float64;
    every other backend passes it over, and is skipped here with its reason."""
    _skip_unless_available(device)
    check_against_oracle(backend, case, bounds, torch.float64, device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_low_precision_within_twice_its_own_rounding(case, dtype, device, backend):
    _skip_unless_available(device)
    check_against_oracle(backend, case, "both" if device == "cpu" else "none", dtype, device)
    if device == "cuda":
        check_against_oracle(backend, case, "both", dtype, device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", CASES)
def test_forward_only_calls_match_oracle(case, dtype, device, backend):
    """Inference calls (no input needs a gradient) may take paths of their own: the eager backend splits
    prefix-causal attention in two parts without a mask (not in float64, which that path would round)."""
    _skip_unless_available(device)
    for bounds in ("none", "both"):
        check_against_oracle(backend, case, bounds, dtype, device, grad=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fill", [float("nan"), float("inf")])
@pytest.mark.parametrize("case", [(3, 24, 80, 2, 2, 32, 32, True), (3, 1, 80, 2, 2, 32, 32, True),
                                  (3, 10, 80, 2, 1, 32, 16, False)])  # fmt: skip
def test_keys_outside_the_bounds_are_never_read(case, fill, device, backend):
    """A preallocated cache may hold anything past kv_len and before kv_start (NaN, inf, torch.empty): it must not
    reach the output, the lse or any gradient."""
    _skip_unless_available(device)
    batch, nq, nk, *_, causal = case
    q, k, v = (t.detach() for t in _inputs(case, torch.float32, device))
    kv_start = torch.tensor([0, 7, 30], dtype=torch.int32, device=device)
    kv_len = torch.tensor([50, 80, 61], dtype=torch.int32, device=device)
    keys = torch.arange(nk, device=device)
    outside = (keys < kv_start[:, None]) | (keys >= kv_len[:, None])
    poisoned_k = k.masked_fill(outside[:, :, None, None], fill).requires_grad_()
    poisoned_v = v.masked_fill(outside[:, :, None, None], fill).requires_grad_()
    q.requires_grad_()
    kwargs = dict(causal=causal, kv_start=kv_start, kv_len=kv_len)
    out, lse, with_grad = strongest_result(backend, q, poisoned_k, poisoned_v, **kwargs)
    ref, ref_lse = attention_oracle(q, k, v, **kwargs)
    assert max_rel_error(out, ref) < FP32_TOL["out"]
    if lse is not None:
        torch.testing.assert_close(lse.double(), ref_lse.detach(), rtol=1e-5, atol=1e-5)
    if with_grad:
        grads = torch.autograd.grad(out, (q, poisoned_k, poisoned_v), torch.ones_like(out))
        assert all(torch.isfinite(g).all() for g in grads)
        assert not grads[1][outside].any() and not grads[2][outside].any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_rows_that_see_nothing_are_zero_with_zero_gradients(device, backend):
    _skip_unless_available(device)
    q, k, v = _inputs((3, 12, 40, 2, 1, 16, 16, True), torch.float32, device)
    kv_start = torch.tensor([40, 5, 0], dtype=torch.int32, device=device)  # row 0: start == len, nothing visible
    kv_len = torch.tensor([40, 30, 0], dtype=torch.int32, device=device)  # row 2: an empty cache
    kwargs = dict(causal=True, kv_start=kv_start, kv_len=kv_len)
    with_grad, with_lse = strongest_call(backend, q, k, v, **kwargs)
    with torch.set_grad_enabled(with_grad):
        result = attention(q, k, v, return_lse=with_lse, backend=backend, **kwargs)
    out, lse = result if with_lse else (result, None)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[2], torch.zeros_like(out[2]))
    if lse is not None:
        assert torch.isneginf(lse[0]).all() and torch.isneginf(lse[2]).all() and torch.isfinite(lse[1]).all()
    ref, _ = attention_oracle(q, k, v, **kwargs)
    assert max_rel_error(out, ref) < FP32_TOL["out"]
    if with_grad:
        out.square().sum().backward()
        for t in (q, k, v):
            assert torch.isfinite(t.grad).all()
            assert torch.equal(t.grad[0], torch.zeros_like(t.grad[0]))
            assert torch.equal(t.grad[2], torch.zeros_like(t.grad[2]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [True, False])
def test_inputs_with_a_strided_head_dim_are_read_by_value(causal, device, backend):
    """q, k, v that are views whose last dim is not contiguous (a transposed ``[..., D, H]`` buffer) give what
    their values give, in the output, the lse and the gradients."""
    _skip_unless_available(device)
    generator = torch.Generator().manual_seed(3)

    def strided(*shape):  # [B, N, H, D] viewed from a [B, N, D, H] buffer: the head dim has stride H
        b, n, h, d = shape
        return torch.randn(b, n, d, h, generator=generator).to(device).transpose(2, 3).requires_grad_()

    q, k, v = strided(2, 6, 2, 16), strided(2, 30, 2, 16), strided(2, 30, 2, 16)
    assert q.stride(-1) != 1
    kv_len = torch.tensor([30, 21], dtype=torch.int32, device=device)
    kwargs = dict(causal=causal, kv_len=kv_len)
    out, lse, with_grad = strongest_result(backend, q, k, v, **kwargs)
    ref, ref_lse = attention_oracle(q, k, v, **kwargs)
    assert max_rel_error(out, ref) < FP32_TOL["out"]
    if lse is not None:
        assert max_rel_error(lse, ref_lse) < FP32_TOL["lse"]
    if with_grad:
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
        for got, want in zip(grads, ref_grads):
            assert max_rel_error(got, want) < FP32_TOL["grad"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("view", ["expanded-int32", "strided-int32", "expanded-int64"])
def test_bounds_given_as_views_are_read_by_value(view, device, backend):
    """Bounds that are views (one value ``expand``-ed to every row, every other element of a longer tensor) mean
    their values, not the memory after their first element."""
    _skip_unless_available(device)
    q, k, v = (t.detach() for t in _inputs((3, 4, 30, 2, 2, 16, 16, True), torch.float32, device))
    if view == "strided-int32":
        kv_len = torch.tensor([22, -1, 17, -1, 29], dtype=torch.int32, device=device)[::2]
    else:
        dtype = torch.int32 if view == "expanded-int32" else torch.int64
        kv_len = torch.tensor([19], dtype=dtype, device=device).expand(3)
    kv_start = torch.tensor([3], dtype=torch.int32, device=device).expand(3)
    kwargs = dict(causal=True, kv_start=kv_start, kv_len=kv_len)
    with torch.no_grad():
        try:
            explain(q, k, v, backend=backend, **kwargs)
        except RuntimeError as error:
            pytest.skip(str(error))
        out = attention(q, k, v, backend=backend, **kwargs)
    ref, _ = attention_oracle(q, k, v, causal=True, kv_start=kv_start.contiguous(), kv_len=kv_len.contiguous())
    assert max_rel_error(out, ref) < FP32_TOL["out"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [True, False])
def test_unchecked_out_of_range_bounds_act_as_clamped(causal, device, backend):
    """Bounds are not read back from a GPU (a sync per call): a backend handed values out of range must read no
    memory outside the keys and compute what the clamped values give (``kv_len`` into ``[0, Nk]``, ``kv_start``
    into ``[0, kv_len]``). The op's checks are bypassed here by calling the backend itself."""
    _skip_unless_available(device)
    q, k, v = (t.detach() for t in _inputs((4, 6, 40, 2, 2, 16, 16, causal), torch.float32, device))
    wild_start = torch.tensor([-5, 3, 50, 2**30], dtype=torch.int32, device=device)
    wild_len = torch.tensor([40, 2**31 - 1, 45, -7], dtype=torch.int32, device=device)
    kv_len = wild_len.clamp(0, 40)
    kv_start = torch.minimum(wild_start.clamp(0, 40), kv_len)
    with torch.no_grad():
        try:
            explain(q, k, v, causal=causal, kv_start=kv_start, kv_len=kv_len, backend=backend)
        except RuntimeError as error:
            pytest.skip(str(error))
        chosen = get_backend(backend)
        common = dict(causal=causal, scale=0.25, return_lse=False, dropout_p=0.0)
        got, _ = chosen.run(q, k, v, kv_start=wild_start, kv_len=wild_len, **common)
        want, _ = chosen.run(q, k, v, kv_start=kv_start, kv_len=kv_len, **common)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_float64_passes_gradcheck_on_eager():
    """What float64 is for: ``torch.autograd.gradcheck`` of the op (causal, grouped heads, bounds with an empty row)."""
    generator = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_()
               for shape in ((2, 3, 4, 5), (2, 7, 2, 5), (2, 7, 2, 3)))  # fmt: skip
    kv_start, kv_len = torch.tensor([1, 4], dtype=torch.int32), torch.tensor([6, 4], dtype=torch.int32)
    for kwargs in (dict(causal=True), dict(causal=True, kv_start=kv_start, kv_len=kv_len), dict(kv_len=kv_len)):
        assert torch.autograd.gradcheck(functools.partial(attention, **kwargs), (q, k, v))


@pytest.mark.parametrize("return_lse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_traced_calls_give_the_dtypes_of_real_ones(dtype, return_lse):
    """Meta and fake tensors (``torch.compile``'s tracing) get the output and lse dtypes a real call gives: the lse
    float32, float64 for float64 inputs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = (t.detach() for t in _inputs((2, 5, 9, 2, 2, 8, 8, True), dtype, "cpu"))
    kv_len = torch.tensor([9, 6], dtype=torch.int32)

    def dtypes(*args, kv_len):
        result = attention(*args, causal=True, kv_len=kv_len, return_lse=return_lse)
        return tuple(t.dtype for t in result) if return_lse else (result.dtype,)

    real = dtypes(q, k, v, kv_len=kv_len)
    assert real == ((dtype, torch.float64 if dtype == torch.float64 else torch.float32) if return_lse else (dtype,))
    assert dtypes(*(t.to("meta") for t in (q, k, v)), kv_len=kv_len.to("meta")) == real
    with FakeTensorMode() as mode:
        assert dtypes(*(mode.from_tensor(t) for t in (q, k, v)), kv_len=mode.from_tensor(kv_len)) == real


def _float64_problem(device, requested):
    """A float64 call every backend but for its dtype could run (CUDA tensors need no GPU to be asked about)."""
    return AttentionProblem(
        device=torch.device(device), dtype=torch.float64, batch=2, num_queries=16, num_keys=16, num_q_heads=2,
        num_kv_heads=2, qk_head_dim=64, v_head_dim=64, causal=True, has_kv_start=False, has_kv_len=False,
        dropout_p=0.0, requires_grad=False, return_lse=False, requested=requested,
    )  # fmt: skip


@pytest.mark.parametrize("backend", [name for name in BACKENDS if name != "eager"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_only_eager_runs_float64(backend, device):
    """Every other backend gives a reason for float64 calls, on CUDA tensors too; auto runs them on eager."""
    assert get_backend(backend).unsupported_reason(_float64_problem(device, backend)) is not None
    q = torch.zeros(2, 16, 2, 64, dtype=torch.float64)
    assert explain(q, q, q, causal=True).backend == "eager"


def test_the_cuda_backends_refuse_float64_for_its_dtype(monkeypatch):
    """On a machine without a GPU or the optional packages the backends above give other reasons first: here those
    checks are passed, and each backend's own dtype check must refuse float64 CUDA calls."""
    from perceiver_fast.kernels import flash_attn
    from perceiver_fast.kernels.triton import backend as triton_backend

    monkeypatch.setattr(triton_backend, "interpreting", lambda: False)
    monkeypatch.setattr(triton_backend, "_triton_missing", lambda: None)
    reasons = {name: get_backend(name).unsupported_reason(_float64_problem("cuda", name))
               for name in ("triton", "cuda", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient")}  # fmt: skip
    reasons["flash-attn (shared checks)"] = flash_attn._common_reason(_float64_problem("cuda", "flash-attn"), 256)
    for name, reason in reasons.items():
        assert reason is not None and "float64" in reason, (name, reason)


def test_every_built_in_backend_is_registered():
    assert {"eager", "triton", "cuda", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flash-attn"} <= set(BACKENDS)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_no_host_sync_on_the_hot_path(backend):
    """The op reads no tensor value back from a GPU (a device sync per call): bounds included, every backend."""
    _skip_unless_available("cuda")
    q, k, v = (t.detach() for t in _inputs((2, 16, 300, 4, 4, 64, 64, True), torch.bfloat16, "cuda"))
    kv_start = torch.tensor([0, 17], dtype=torch.int32, device="cuda")
    kv_len = torch.tensor([300, 250], dtype=torch.int32, device="cuda")
    for kwargs in (dict(causal=True), dict(causal=True, kv_start=kv_start, kv_len=kv_len)):
        try:
            explain(q, k, v, backend=backend, **kwargs)
        except RuntimeError:
            continue  # this backend cannot run the call
        attention(q, k, v, backend=backend, **kwargs)  # compile and tune first
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            attention(q, k, v, backend=backend, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
