"""The decoding-step op (rotary + cache write + attention): the composite step against a float64 oracle on CPU, its
argument checks and dispatch, and on a GPU (``gpu`` marker) the fused CUDA kernel against the same oracle and
against the composite step."""

from __future__ import annotations

import os
import zlib

import pytest
import torch

from perceiver_fast.kernels import attention, cuda, dispatch
from perceiver_fast.kernels.decode import DECODE_BACKEND_ENV_VAR, decode_attention, explain_decode
from perceiver_fast.kernels.problem import AttentionProblem
from tests.oracle import attention_oracle, max_rel_error, random_bounds, rotary_oracle

CAPACITY = 40


def _step_inputs(batch, q_heads, kv_heads, qk_dim, v_dim, rotate_dim, dtype, device, generator):
    def make(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    q, k, v = make(batch, 1, q_heads, qk_dim), make(batch, 1, kv_heads, qk_dim), make(batch, 1, kv_heads, v_dim)
    # Head-major storage viewed as [B, C, H, D], like the layers' caches.
    k_cache = make(batch, kv_heads, CAPACITY, qk_dim).transpose(1, 2)
    v_cache = make(batch, kv_heads, CAPACITY, v_dim).transpose(1, 2)
    cos = sin = None
    if rotate_dim:
        angles = torch.rand(batch, rotate_dim // 2, generator=generator) * 40
        angles = angles.repeat_interleave(2, dim=-1).to(device)
        cos, sin = angles.cos(), angles.sin()
    return q, k, v, k_cache, v_cache, cos, sin


def _oracle(q, k, v, k_cache, v_cache, positions, cos, sin, kv_start, kv_len, dtype):
    """Rotate (rounded to the storage dtype, as the op stores it), write, attend: all in float64."""
    q_rot = rotary_oracle(q, cos, sin).to(dtype).double()
    k_rot = rotary_oracle(k, cos, sin).to(dtype).double()
    keys, values = k_cache.double().clone(), v_cache.double().clone()
    for b, p in enumerate(positions):
        keys[b, p], values[b, p] = k_rot[b, 0], v[b, 0].double()
    out, lse = attention_oracle(q_rot, keys, values, kv_start=kv_start, kv_len=kv_len)
    return out, lse, keys, values


CASES = [
    # (batch, q heads, kv heads, qk dim, v dim, rotary dim)
    (3, 2, 2, 16, 16, 16),  # rotary on every channel
    (3, 4, 2, 32, 16, 8),  # grouped heads, Dqk != Dv, rotary on the first channels only
    (2, 2, 2, 16, 16, 0),  # no rotary
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("position_kind", ["int", "one", "per-row"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_composite_step_matches_the_oracle(case, position_kind, dtype):
    generator = torch.Generator().manual_seed(zlib.crc32(repr((case, position_kind)).encode()))
    batch, hq, hkv, dqk, dv, rotate_dim = case
    q, k, v, k_cache, v_cache, cos, sin = _step_inputs(batch, hq, hkv, dqk, dv, rotate_dim, dtype, "cpu", generator)
    kv_start, kv_len = random_bounds(batch, CAPACITY, generator=generator, allow_empty=False)
    if position_kind == "int":
        position, positions = 17, [17] * batch
    elif position_kind == "one":
        position, positions = torch.tensor([11]), [11] * batch
    else:  # each row writes where its keys end (the new key is the last one it sees)
        position = kv_len - 1
        positions = position.tolist()
    expected, expected_lse, keys, values = _oracle(
        q, k, v, k_cache, v_cache, positions, cos, sin, kv_start, kv_len, dtype
    )
    k_before, v_before = k_cache.clone(), v_cache.clone()
    with torch.no_grad():
        out, lse = decode_attention(
            q, k, v, k_cache, v_cache, position, kv_start=kv_start, kv_len=kv_len, cos=cos, sin=sin,
            return_lse=True, backend="composite",
        )  # fmt: skip
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert max_rel_error(out, expected) < tol
    assert max_rel_error(lse, expected_lse) < tol
    # The cache now holds the rotated key and the value at each row's position, and nothing else changed.
    written = torch.zeros(batch, CAPACITY, dtype=torch.bool)
    written[torch.arange(batch), torch.tensor(positions)] = True
    for cache, before, expected_rows in ((k_cache, k_before, keys), (v_cache, v_before, values)):
        assert torch.equal(cache[~written], before[~written])
        torch.testing.assert_close(cache[written].double(), expected_rows[written].to(dtype).double())


@pytest.mark.parametrize("packed", [False, True], ids=["own-projections", "packed-projections"])
@pytest.mark.parametrize("return_query", [False, True])
def test_the_op_matches_a_model_layer_step(packed, return_query):
    """A layer's decoding step (write the new row, attend) through the op equals the layer's full attention, with
    the layer's own projections and with a decoder's packed copy of them."""
    from perceiver_fast.models.core.attention import MultiHeadAttention
    from perceiver_fast.models.core.packed import PackedProjections
    from perceiver_fast.models.core.position import FrequencyPositionEncoding, RotaryPositionEmbedding

    torch.manual_seed(0)
    layer = MultiHeadAttention(num_heads=2, num_q_input_channels=32, num_kv_input_channels=32, causal_attention=True)
    x = torch.randn(2, 9, 32)
    angles = FrequencyPositionEncoding(16)(torch.arange(9).expand(2, 9))
    rot = RotaryPositionEmbedding(angles)
    with torch.no_grad():
        full = layer(x, x, rot_pos_emb_q=rot, rot_pos_emb_k=rot)
        layer.setup_cache(2, 16, dtype=torch.float32, device="cpu")
        if packed:
            PackedProjections([layer]).attach()
        layer.write_cache(x[:, :8], 0, RotaryPositionEmbedding(angles[:, :8]))
        new_rot = RotaryPositionEmbedding(angles[:, 8:])
        attended = layer.attend_new(
            x[:, 8:], torch.tensor([8]), new_rot, kv_len=torch.full((2,), 9, dtype=torch.int32),
            return_query=return_query,
        )  # fmt: skip
    assert (layer.kv_cache.packed is not None) == packed
    if return_query:
        attended, q = attended
        torch.testing.assert_close(q, layer.project_queries(x[:, 8:], new_rot), rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.project_output(attended), full[:, 8:], rtol=1e-5, atol=1e-6)


def _valid_args():
    generator = torch.Generator().manual_seed(1)
    q, k, v, k_cache, v_cache, cos, sin = _step_inputs(2, 2, 2, 16, 16, 8, torch.float32, "cpu", generator)
    return dict(q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache, position=torch.tensor([3]), cos=cos, sin=sin)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda a: a.update(q=a["q"].expand(2, 2, 2, 16)), ValueError, "one query per row"),
        (lambda a: a.update(k=a["k"][:, :, :1]), ValueError, "k must be"),
        (lambda a: a.update(v=a["v"].to(torch.float64)), TypeError, "dtype"),
        (lambda a: a.update(k=a["k"].to(torch.bfloat16)), TypeError, "q's dtype"),
        (lambda a: a.update(position=CAPACITY), ValueError, "position values"),
        (lambda a: a.update(position=torch.tensor([0, -1])), ValueError, "position values"),
        (lambda a: a.update(position=torch.tensor([1, 2, 3])), ValueError, "1 or B"),
        (lambda a: a.update(position=1.0), TypeError, "position must be"),
        (lambda a: a.update(position=True), TypeError, "position must be"),
        (lambda a: a.update(sin=None), ValueError, "together"),
        (lambda a: a.update(cos=a["cos"][:, :7], sin=a["sin"][:, :7]), ValueError, "even"),
        (lambda a: a.update(cos=a["cos"].double(), sin=a["sin"].double()), TypeError, "floating-point"),
        (lambda a: a.update(cos=a["cos"].bfloat16()), TypeError, "share a dtype"),
        (lambda a: a.update(k_cache=a["k_cache"][..., 0]), ValueError, "k_cache must have shape"),
        (lambda a: a.update(v_cache=a["v_cache"][:, :8]), ValueError, "k_cache .* and v_cache .* must agree"),
        (lambda a: a.update(k_cache=a["k_cache"].half()), TypeError, "q, k_cache, v_cache must share a dtype"),
        (lambda a: a.update(v_cache=a["v_cache"].to("meta")), ValueError, "q, k_cache, v_cache must be on one"),
        (lambda a: a.update(backend="fused"), ValueError, "not one of"),
        (lambda a: a.update(backend="cuda"), RuntimeError, "CPU tensors"),
    ],
)
def test_bad_arguments_raise(change, error, match):
    args = _valid_args()
    change(args)
    with torch.no_grad(), pytest.raises(error, match=match):
        decode_attention(**args)


def test_a_step_with_gradients_is_refused():
    args = _valid_args()
    args["q"].requires_grad_()
    with pytest.raises(ValueError, match="no_grad"):
        decode_attention(**args)


def test_a_bad_environment_backend_is_named(monkeypatch):
    monkeypatch.setenv(DECODE_BACKEND_ENV_VAR, "fused")
    with torch.no_grad(), pytest.raises(ValueError, match=DECODE_BACKEND_ENV_VAR):
        decode_attention(**_valid_args())


def test_explain_says_why_the_fused_kernel_is_passed_over_on_cpu():
    report = explain_decode(**_valid_args())
    assert report.backend == "composite"
    assert "CPU tensors" in report.passed_over["cuda"]
    assert "composite" in report.decided_by


def _gpu_problem() -> AttentionProblem:
    return AttentionProblem(
        device=torch.device("cuda", 0), dtype=torch.bfloat16, batch=1, num_queries=1, num_keys=16384,
        num_q_heads=8, num_kv_heads=8, qk_head_dim=128, v_head_dim=128, causal=False, has_kv_start=True,
        has_kv_len=True, dropout_p=0.0, requires_grad=False, return_lse=False,
    )  # fmt: skip


def test_auto_runs_the_fused_kernel_only_where_a_table_row_measured_it_fastest(monkeypatch):
    monkeypatch.setattr(dispatch, "device_capability", lambda device: (9, 0))
    row = dict(dtype="bfloat16", regime="decode-step", head_dim=128, keys=16384, bounds=True, grad=False)
    for order, expected in ((["cuda", "composite"], "cuda"), (["composite", "cuda"], "composite")):
        key = dispatch.ProblemClass(**row)
        table = {"device": "NVIDIA H200", "date": "2026-11-27", "rows_by_class": {key: {**row, "order": order}}}
        monkeypatch.setattr(dispatch, "load_table", lambda capability, table=table: table)
        policy = dispatch.decode_step_policy(_gpu_problem())
        assert policy.order[0] == expected and "decode-step" in policy.source
    monkeypatch.setattr(dispatch, "load_table", lambda capability: None)
    assert dispatch.decode_step_policy(_gpu_problem()).order == ("composite",)


# --- on a GPU: the fused kernel -----------------------------------------------------------------------------------


def _require_fused():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    missing = cuda.library_status()
    if missing is None and not hasattr(torch.ops.perceiver_fast_cuda, "decode_attention_fwd"):
        missing = "the CUDA extension has no decode_attention_fwd"
    if missing is not None:
        if os.environ.get("PERCEIVER_FAST_REQUIRE_CUDA_EXT") == "1":
            pytest.fail(missing)
        pytest.skip(missing)


GPU_CASES = [
    # (batch, q heads, kv heads, head dim, rotary dim, capacity, splits)
    (3, 8, 8, 128, 128, 700, 1),
    (3, 8, 8, 128, 32, 5000, None),  # splits chosen for the GPU
    (2, 8, 2, 64, 64, 3000, 7),  # grouped heads
    (1, 4, 4, 32, 0, 300, 3),  # no rotary
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "-".join(map(str, c)))
def test_fused_step_matches_the_oracle_and_the_composite_step(case, dtype):
    _require_fused()
    batch, hq, hkv, dim, rotate_dim, capacity, splits = case
    generator = torch.Generator().manual_seed(7)

    def make(*shape):
        return torch.randn(*shape, generator=generator).to(device="cuda", dtype=dtype)

    q, k, v = make(batch, 1, hq, dim), make(batch, 1, hkv, dim), make(batch, 1, hkv, dim)
    k_cache, v_cache = make(batch, hkv, capacity, dim).transpose(1, 2), make(batch, hkv, capacity, dim).transpose(1, 2)
    kv_start, kv_len = (t.cuda() for t in random_bounds(batch, capacity, generator=generator))
    k_cache[:, -1] = float("nan")  # never inside a row's bounds below (kv_len < capacity): must not leak
    kv_len = kv_len.clamp(max=capacity - 1)
    kv_start = torch.minimum(kv_start, kv_len - 1).clamp(min=0)
    position = kv_len - 1
    cos = sin = None
    if rotate_dim:
        angles = (torch.rand(batch, rotate_dim // 2, generator=generator) * 100).repeat_interleave(2, -1).cuda()
        cos, sin = angles.cos(), angles.sin()
    expected, expected_lse, keys, values = _oracle(
        q.cpu(), k.cpu(), v.cpu(), k_cache.cpu(), v_cache.cpu(), position.tolist(),
        None if cos is None else cos.cpu(), None if sin is None else sin.cpu(), kv_start.cpu(), kv_len.cpu(), dtype,
    )  # fmt: skip
    caches = (k_cache.clone(), v_cache.clone())
    with torch.no_grad():
        out, lse = cuda.cuda_decode_attention(
            q, k, v, k_cache, v_cache, position, rotary=None if cos is None else (cos, sin), kv_start=kv_start,
            kv_len=kv_len, scale=dim**-0.5, num_splits=splits,
        )  # fmt: skip
        ref_out, ref_lse = decode_attention(
            q, k, v, *caches, position, kv_start=kv_start, kv_len=kv_len, cos=cos, sin=sin, return_lse=True,
            backend="composite",
        )  # fmt: skip
    rounding = (expected.to(dtype).double() - expected).abs().max()
    assert (out.cpu().double() - expected).abs().max() <= 2 * rounding + 2e-3
    assert (lse.cpu().double() - expected_lse).abs().max() <= 1e-3
    assert (out.double() - ref_out.double()).abs().max() <= 2 * rounding + 2e-3
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-3)
    # Both wrote the same rows (the rotation rounds alike), the fused kernel nowhere else.
    torch.testing.assert_close(k_cache, caches[0], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, caches[1], rtol=0, atol=0)


def test_a_converted_models_16_bit_angles_rotate_as_the_model_does():
    """``model.to(torch.bfloat16)`` converts the rotary buffers too: the step takes its bf16 angles and rotates
    with them exactly as the model's own rotation does."""
    from perceiver_fast.models.core.position import RotaryPositionEmbedding

    generator = torch.Generator().manual_seed(5)
    q, k, v, k_cache, v_cache, _, _ = _step_inputs(2, 2, 2, 16, 16, 16, torch.bfloat16, "cpu", generator)
    angles = (torch.rand(2, 1, 8, generator=generator) * 50).repeat_interleave(2, dim=-1).bfloat16()
    rot = RotaryPositionEmbedding(angles)
    cos, sin = rot.angles(1)
    with torch.no_grad():
        out = decode_attention(q, k, v, k_cache, v_cache, 4, kv_len=torch.tensor([5, 5]), cos=cos, sin=sin)
    assert torch.equal(k_cache[:, 4:5], rot.rotate(k))
    keys = k_cache[:, :5].clone()
    expected = attention(rot.rotate(q), keys, v_cache[:, :5])
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
