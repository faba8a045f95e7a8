"""The "cuda" backend's Python side on a machine without the binary or a GPU: registration, the reasons it gives
for passing a call over, the split-KV choice, and the op's fake implementation (what torch.compile sees)."""

from __future__ import annotations

import pytest
import torch

from perceiver_fast.kernels import api, available_backends, cuda, dispatch, explain


def _problem(**overrides) -> api.AttentionProblem:
    fields = dict(
        device=torch.device("cuda"), dtype=torch.bfloat16, batch=2, num_queries=4, num_keys=8, num_q_heads=4,
        num_kv_heads=2, qk_head_dim=64, v_head_dim=64, causal=True, has_kv_start=False, has_kv_len=False,
        dropout_p=0.0, requires_grad=False, return_lse=False,
    )  # fmt: skip
    fields.update(overrides)
    return api.AttentionProblem(**fields)


@pytest.fixture
def no_library(monkeypatch, tmp_path):
    monkeypatch.setenv(cuda.LIBRARY_ENV_VAR, str(tmp_path / "missing_C.so"))
    cuda.library_status.cache_clear()
    yield
    cuda.library_status.cache_clear()


def test_registered_but_used_by_auto_only_where_a_table_measured_it_fastest():
    assert "cuda" in available_backends()
    assert "cuda" not in dispatch.DEFAULT_ORDER_CUDA


def test_cpu_tensors_pass_it_over_under_auto():
    q = torch.randn(1, 3, 2, 16)
    dispatch = explain(q, q, q)
    assert dispatch.backend == "eager"
    assert "CUDA tensors only" in dispatch.passed_over["cuda"]
    with pytest.raises(RuntimeError, match="CUDA tensors only"):
        explain(q, q, q, backend="cuda")


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"requires_grad": True}, "forward-only (backward runs on Triton/eager)"),
        ({"dropout_p": 0.1}, "dropout_p > 0"),
        ({"dtype": torch.float32}, "float16/bfloat16 only"),
        ({"dtype": torch.float32, "requires_grad": True}, "float16/bfloat16 only"),  # the first reason it meets
        ({"v_head_dim": 160}, "head dim 160 > 128"),
        ({}, "does not exist"),  # a supported problem: only the missing library stands in the way
    ],
)
def test_reasons_it_passes_a_call_over(no_library, overrides, reason):
    assert reason in cuda.CudaBackend().unsupported_reason(_problem(**overrides))


def test_absent_library_is_recorded_not_raised(monkeypatch, tmp_path):
    monkeypatch.delenv(cuda.LIBRARY_ENV_VAR, raising=False)
    monkeypatch.setattr(cuda, "_candidates", lambda: [])
    cuda.library_status.cache_clear()
    try:
        assert "not built" in cuda.library_status()
        broken = tmp_path / "_C.so"
        broken.write_bytes(b"not a shared library")
        monkeypatch.setattr(cuda, "_candidates", lambda: [broken])
        cuda.library_status.cache_clear()
        assert "failed to load" in cuda.library_status()
        with pytest.raises(RuntimeError, match="failed to load"):
            q = torch.randn(1, 2, 1, 8)
            cuda.cuda_attention(q, q, q, causal=False, kv_start=None, kv_len=None, scale=1.0)
    finally:
        cuda.library_status.cache_clear()


@pytest.mark.parametrize(
    ("shape", "splits"),
    [
        # (batch, kv heads, packed rows, keys, SMs)
        ((16, 16, 1024, 1024, 132), 1),  # a full grid: no split
        ((1, 8, 4, 4096, 132), 17),  # decoding one token over a long cache: 8 blocks -> 136
        ((1, 1, 1, 128, 132), 1),  # two key tiles: not worth a reduction pass
        ((1, 1, 1, 1 << 20, 132), cuda.MAX_SPLITS),  # capped
    ],
)
def test_num_splits_fills_the_gpu(shape, splits):
    batch, heads, rows, keys, sms = shape
    got = cuda.choose_num_splits(batch=batch, num_kv_heads=heads, packed_rows=rows, num_keys=keys, sm_count=sms)
    assert got == splits


def test_num_splits_counts_the_blocks_of_the_kernel_that_runs():
    """Perceiver AR at batch 1 (DESIGN.md): 1024 latents x 16 heads are 256 blocks of 64 rows but only 128 blocks of
    the fast kernel's 128 rows, fewer than an H100's 132 SMs: split the keys in two."""
    shape = dict(batch=1, num_kv_heads=16, packed_rows=1024, num_keys=16384, sm_count=132)
    assert cuda.choose_num_splits(**shape, rows_per_block=cuda.BLOCK_M) == 1
    assert cuda.choose_num_splits(**shape, rows_per_block=cuda.FLASH_BLOCK_M) == 2


@pytest.mark.parametrize(
    ("dims", "aligned", "rows"),
    [
        ((64, 64), True, 128),
        ((128, 128), True, 128),
        ((40, 72), True, 128),  # Dqk != Dv share the 128 tile
        ((33, 16), True, 128),
        ((32, 32), True, 64),  # head dims up to 32 keep the 64-row kernel
        ((64, 64), False, 64),  # rows not 16-byte aligned: no cp.async
    ],
)
def test_block_rows_follow_the_kernel_choice(dims, aligned, rows):
    assert cuda.block_rows(*dims, aligned=aligned) == rows


def test_row_alignment_is_judged_from_strides():
    assert cuda._rows_aligned(torch.empty(2, 3, 4, 8), torch.empty(1, 5, 2, 64))
    assert not cuda._rows_aligned(torch.empty(2, 3, 4, 36))  # contiguous rows of 36 elements
    assert cuda._rows_aligned(torch.empty(2, 3, 4, 40)[..., :36])  # a view of padded rows
    assert not cuda._rows_aligned(torch.empty(2, 3, 4, 17)[..., :16])  # whole chunks, but rows 17 apart


def test_fake_implementation_gives_shapes_and_dtypes():
    q = torch.empty(2, 5, 4, 24, dtype=torch.bfloat16, device="meta")
    k = torch.empty(2, 9, 2, 24, dtype=torch.bfloat16, device="meta")
    v = torch.empty(2, 9, 2, 40, dtype=torch.bfloat16, device="meta")
    bounds = torch.empty(2, dtype=torch.int32, device="meta")
    out, lse = torch.ops.perceiver_fast.cuda_attention_fwd(q, k, v, bounds, bounds, True, 0.2, 3)
    assert out.shape == (2, 5, 4, 40) and out.dtype == torch.bfloat16
    assert lse.shape == (2, 4, 5) and lse.dtype == torch.float32


def test_torch_compile_traces_the_op_without_graph_breaks():
    """On meta tensors the op runs its fake implementation, so tracing is checked without the library or a GPU."""
    q = torch.empty(1, 8, 2, 32, dtype=torch.float16, device="meta")
    bounds = torch.empty(1, dtype=torch.int32, device="meta")

    def f(q):
        out, lse = torch.ops.perceiver_fast.cuda_attention_fwd(q, q, q, bounds, bounds, False, 0.5, 1)
        return out + 1, lse

    out, lse = torch.compile(f, fullgraph=True, backend="eager")(q)
    assert out.shape == (1, 8, 2, 32) and lse.shape == (1, 2, 8)


def test_decode_positions_past_int32_reach_the_kernel_out_of_range(monkeypatch):
    """On a GPU positions are not read back (no check); narrowing 2**32 + 5 to int32 must not make it row 5, which
    the kernel would overwrite: out-of-range positions reach it as -1, where it writes nothing."""
    seen = {}

    def capture(q, k, v, k_cache, v_cache, position, *rest):
        seen["position"] = position.tolist()
        return None, None

    monkeypatch.setattr(cuda, "_decode_kernels", capture)  # what a plain eager call runs
    batch, capacity, heads, dim = 4, 16, 1, 8
    q = torch.randn(batch, 1, heads, dim, dtype=torch.bfloat16)
    cache = torch.zeros(batch, capacity, heads, dim, dtype=torch.bfloat16)
    position = torch.tensor([2**32 + 5, -(2**32) + 3, 15, 16], dtype=torch.int64)
    cuda.cuda_decode_attention(
        q, q, q, cache, cache.clone(), position, rotary=None, kv_start=None, kv_len=None, scale=1.0, num_splits=1
    )
    assert seen["position"] == [-1, -1, 15, -1]


def _refuse(*args):
    raise AssertionError("ran the kernels")


def test_eager_calls_run_the_kernels_without_the_custom_ops(monkeypatch):
    """Plain eager calls skip the registered ops (their dispatch costs more host time than SDPA's whole call)."""
    ran = []
    monkeypatch.setattr(cuda, "library_status", lambda: None)
    monkeypatch.setattr(cuda, "_attention_kernels", lambda *args: ran.append("attention") or (args[0], args[0]))
    monkeypatch.setattr(cuda, "_decode_kernels", lambda *args: ran.append("decode") or (args[0], args[0]))
    monkeypatch.setattr(cuda, "_cuda_attention_fwd", _refuse)
    monkeypatch.setattr(cuda, "_cuda_decode_attention", _refuse)
    q = torch.randn(2, 3, 2, 16, dtype=torch.bfloat16)
    cache = torch.zeros(2, 8, 2, 16, dtype=torch.bfloat16)
    cuda.cuda_attention(q, q, q, causal=True, kv_start=None, kv_len=None, scale=0.5, num_splits=1)
    cuda.cuda_decode_attention(
        q[:, :1], q[:, :1], q[:, :1], cache, cache.clone(), 3, rotary=None, kv_start=None, kv_len=None, scale=0.5,
        num_splits=1,
    )  # fmt: skip
    assert ran == ["attention", "decode"]


def test_eager_decode_bumps_the_versions_of_the_caches_it_writes(monkeypatch):
    """The kernel writes the caches through raw pointers: as the op would, the direct call bumps their versions, so
    a backward that saved a cache before the write is refused instead of reading the new row."""
    monkeypatch.setattr(cuda, "_decode_kernels", lambda *args: (args[0], args[0]))
    q = torch.randn(2, 1, 2, 16, dtype=torch.bfloat16)
    k_cache, v_cache = torch.zeros(2, 8, 2, 16, dtype=torch.bfloat16), torch.zeros(2, 8, 2, 16, dtype=torch.bfloat16)
    weight = torch.ones(16, dtype=torch.bfloat16, requires_grad=True)
    saved = (k_cache * weight).sum()
    versions = k_cache._version, v_cache._version
    cuda.cuda_decode_attention(
        q, q, q, k_cache, v_cache, 3, rotary=None, kv_start=None, kv_len=None, scale=0.5, num_splits=1
    )
    assert k_cache._version > versions[0] and v_cache._version > versions[1]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()
    with torch.inference_mode():  # inference tensors keep no version
        cache = torch.zeros(2, 8, 2, 16, dtype=torch.bfloat16)
    cuda.cuda_decode_attention(
        q, q, q, cache, cache, 3, rotary=None, kv_start=None, kv_len=None, scale=0.5, num_splits=1
    )  # fmt: skip


def test_fake_tensors_go_through_the_custom_ops(monkeypatch):
    """Under FakeTensorMode (as when torch.compile or export traces) the ops' fake implementations answer: the kernel
    bodies, which would launch on a GPU, are not called."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(cuda, "library_status", lambda: None)
    monkeypatch.setattr(cuda, "_attention_kernels", _refuse)
    monkeypatch.setattr(cuda, "_decode_kernels", _refuse)
    with FakeTensorMode():
        q = torch.empty(2, 3, 2, 16, dtype=torch.bfloat16)
        cache = torch.empty(2, 8, 2, 24, dtype=torch.bfloat16)
        out, lse = cuda.cuda_attention(q, q, q, causal=True, kv_start=None, kv_len=None, scale=0.5, num_splits=2)
        assert out.shape == (2, 3, 2, 16) and lse.shape == (2, 2, 3)
        row, v_row = torch.empty(2, 1, 2, 16, dtype=torch.bfloat16), torch.empty(2, 1, 2, 24, dtype=torch.bfloat16)
        out, lse = cuda.cuda_decode_attention(
            row, row, v_row, cache[..., :16], cache, 3, rotary=None, kv_start=None, kv_len=None, scale=0.5,
            num_splits=2,
        )  # fmt: skip
        assert out.shape == (2, 1, 2, 24) and lse.shape == (2, 2, 1)
