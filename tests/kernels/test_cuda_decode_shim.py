"""The fused decode step of ``csrc/attention_decode.cuh`` run on the CPU shim: rotary on the new query and key, the
new key/value stored into the static cache, split-KV attention over the cache, the combine pass.

``csrc/shim_attention.cpp`` (``pf_shim_decode``) compiles the kernel against ``csrc/cpu_shim.h``; each case is
compared with a float64 oracle built from the model's own steps: q and k rotated (``x * cos + rot(x) * sin``, then
rounded to the storage dtype, as ``perceiver_fast/models/core/position.py`` does), the new row written into a copy of
the cache, then ``tests.oracle.attention_oracle``. The caches are head-major views into buffers with guard rows,
filled with NaN wherever no row may read (outside every row's key bounds, and at the new row's position, where the
cache holds the stale value of an earlier step), so a read it must not make shows as NaN, and a store it must not
make shows in the buffer. Broken variants of the kernel show that the checks catch each kind of mistake.
"""

from __future__ import annotations

import ctypes
import math
import zlib

import pytest
import torch

from perceiver_fast.kernels.rotary import rotate_interleaved
from tests.kernels.test_cuda_shim import _check, _check_bf16, shim, take_fault  # noqa: F401 (shim: fixture)
from tests.oracle import attention_oracle, rotary_oracle

DTYPE_CODES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
# csrc/shim_attention.cpp: enum DecodeVariant.
VARIANTS = {"correct": 0, "rotary-sign-swapped": 1, "reads-cache-at-position": 2, "merge-without-rescale": 3,
            "split-ends-one-early": 4}  # fmt: skip
GUARD = 3  # NaN rows either side of each head's cache rows in its buffer


@pytest.fixture(scope="module")
def lib(shim):  # noqa: F811
    shim.pf_shim_decode.restype = ctypes.c_int
    shim.pf_shim_decode.argtypes = [ctypes.c_void_p] * 16 + [ctypes.c_float] + [ctypes.c_int] * 4
    shim.pf_shim_decode_group_tile.argtypes = [ctypes.c_int]
    shim.pf_shim_decode_smem_bytes.restype = ctypes.c_long
    shim.pf_shim_decode_smem_bytes.argtypes = [ctypes.c_int, ctypes.c_int]
    return shim


def _aligned(t: torch.Tensor) -> bool:
    """Every (batch, seq, head) row of t starts 16-byte aligned (ops.cu: row_aligned)."""
    step = 16 // t.element_size()
    return t.data_ptr() % 16 == 0 and all(s % step == 0 for s in t.stride()[:3])


class Step:
    """The tensors of one decoding step; the caches are views ``[B, C, H, D]`` of head-major buffers with GUARD rows
    either side of each head's rows."""

    def __init__(self, *, dtype, batch, capacity, hq, hkv, dqk, dv, rotary_dim, kv_start, kv_len, position, gen,
                 packed=False, unaligned_cache=False):  # fmt: skip
        self.dtype, self.capacity = dtype, capacity
        rows = capacity + 2 * GUARD

        def buffer(dim):  # unaligned: one element past a 16-byte boundary, and so is every row
            values = torch.randn(batch * hkv * rows * dim, generator=gen).to(dtype)
            storage = torch.empty(values.numel() + int(unaligned_cache), dtype=dtype)
            storage[int(unaligned_cache) :] = values
            return storage[int(unaligned_cache) :].view(batch, hkv, rows, dim)

        self.k_buffer, self.v_buffer = buffer(dqk), buffer(dv)
        self.k_cache = self.k_buffer[:, :, GUARD : GUARD + capacity].transpose(1, 2)
        self.v_cache = self.v_buffer[:, :, GUARD : GUARD + capacity].transpose(1, 2)
        self.kv_start = torch.tensor(kv_start, dtype=torch.int32)
        self.kv_len = torch.tensor(kv_len, dtype=torch.int32)
        self.position = torch.tensor(position, dtype=torch.int32)
        # Nothing outside a row's [kv_start, kv_len) may be read, nor the stale row at its position.
        for buffer in (self.k_buffer, self.v_buffer):
            buffer[:, :, :GUARD] = float("nan")
            buffer[:, :, GUARD + capacity :] = float("nan")
        for b in range(batch):
            start, length = max(kv_start[b], 0), min(max(kv_len[b], 0), capacity)
            for cache in (self.k_cache, self.v_cache):
                cache[b, :start] = float("nan")
                cache[b, max(length, start) :] = float("nan")
                if 0 <= position[b] < capacity:
                    cache[b, position[b]] = float("nan")
        if packed:
            # q, k_new, v_new as views of one projection output shifted by an element
            width = hq * dqk + hkv * dqk + hkv * dv
            flat = torch.randn(batch, 1, width + 1, generator=gen).to(dtype)[..., 1:]
            self.q = flat[..., : hq * dqk].unflatten(-1, (hq, dqk))
            self.k_new = flat[..., hq * dqk : (hq + hkv) * dqk].unflatten(-1, (hkv, dqk))
            self.v_new = flat[..., (hq + hkv) * dqk :].unflatten(-1, (hkv, dv))
        else:
            self.q = torch.randn(batch, 1, hq, dqk, generator=gen).to(dtype)
            self.k_new = torch.randn(batch, 1, hkv, dqk, generator=gen).to(dtype)
            self.v_new = torch.randn(batch, 1, hkv, dv, generator=gen).to(dtype)
        # The model's angles: (position - pad count) * inv_freq, each repeated for a pair.
        inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / max(rotary_dim, 1)))
        angles = (self.position - self.kv_start).clamp(min=0).float()[:, None] * inv_freq
        angles = angles.repeat_interleave(2, dim=-1)
        self.cos, self.sin = angles.cos().contiguous(), angles.sin().contiguous()

    def vec_ok(self) -> bool:
        """What ops.cu passes: the cache rows are read with vector loads (the new rows element by element)."""
        return _aligned(self.k_cache) and _aligned(self.v_cache)


def rotate_like_the_model(x, cos, sin):
    """``x [B, 1, H, D]`` (storage dtype) rotated by the model's own function (``cos``/``sin`` ``[B, R]``)."""
    return rotate_interleaved(x, cos[:, None, None, :], sin[:, None, None, :])


def rotate_float64(x, cos, sin):
    """The rotation in float64 from the stored inputs, rounded to the storage dtype (the oracle's q and k)."""
    return rotary_oracle(x, cos, sin).to(x.dtype)


def call_decode(lib, step: Step, *, scale, num_splits, vec_ok=None, variant="correct"):
    """Run pf_shim_decode on ``step`` (its caches change in place): ``(status, fault, out, lse)``."""
    batch, _, hq, _ = step.q.shape
    dv = step.v_new.shape[3]
    out = torch.full((batch, 1, hq, dv), float("nan"), dtype=step.dtype)
    lse = torch.full((batch, hq, 1), float("nan"))
    part_out = torch.full((num_splits, batch, hq, 1, dv), float("nan"))
    part_lse = torch.full((num_splits, batch, hq, 1), float("nan"))
    tensors = (step.q, step.k_new, step.v_new, step.k_cache, step.v_cache, out)
    per_row = [t.stride(0) for t in (step.position, step.kv_start, step.kv_len)]
    strides = torch.tensor([s for t in tensors for s in t.stride()[:3]] + per_row, dtype=torch.int64)
    dims = torch.tensor(
        [batch, step.capacity, hq, step.k_new.shape[2], step.q.shape[3], dv, step.cos.shape[1]], dtype=torch.int32
    )
    status = lib.pf_shim_decode(
        step.q.data_ptr(), step.k_new.data_ptr(), step.v_new.data_ptr(), step.k_cache.data_ptr(),
        step.v_cache.data_ptr(), step.position.data_ptr(), step.cos.data_ptr(), step.sin.data_ptr(),
        step.kv_start.data_ptr(), step.kv_len.data_ptr(), out.data_ptr(), lse.data_ptr(), part_out.data_ptr(),
        part_lse.data_ptr(), strides.data_ptr(), dims.data_ptr(), scale, num_splits,
        int(step.vec_ok() if vec_ok is None else vec_ok), DTYPE_CODES[step.dtype], VARIANTS[variant],
    )  # fmt: skip
    return status, take_fault(lib), out, lse


def oracle(step: Step, scale):
    """float64 ``(out, lse)`` of the step, from the model's steps written out one by one."""
    q = rotate_float64(step.q, step.cos, step.sin)
    k_new = rotate_float64(step.k_new, step.cos, step.sin)
    k, v = step.k_cache.double().clone(), step.v_cache.double().clone()
    for b, pos in enumerate(step.position.tolist()):
        if 0 <= pos < step.capacity:
            k[b, pos], v[b, pos] = k_new[b, 0].double(), step.v_new[b, 0].double()
    # Keys outside the bounds do not exist; the oracle multiplies whole matrices, where 0 * NaN would be NaN.
    k, v = k.nan_to_num(), v.nan_to_num()
    length = step.kv_len.clamp(0, step.capacity)
    start = step.kv_start.clamp(min=0).minimum(length)
    return attention_oracle(q, k, v, kv_start=start, kv_len=length, scale=scale)


def expected_buffers(step: Step):
    """The cache buffers as they must be after the step: the rotated key and the value at each row's position when
    it lies in [0, C), nothing else changed."""
    k_buffer, v_buffer = step.k_buffer.clone(), step.v_buffer.clone()
    k_new = rotate_like_the_model(step.k_new, step.cos, step.sin)
    for b, pos in enumerate(step.position.tolist()):
        if 0 <= pos < step.capacity:
            k_buffer[b, :, GUARD + pos] = k_new[b, 0]
            v_buffer[b, :, GUARD + pos] = step.v_new[b, 0]
    return k_buffer, v_buffer


def run_and_check(lib, step: Step, *, scale, num_splits, vec_ok=None):
    want_k, want_v = expected_buffers(step)
    ref, ref_lse = oracle(step, scale)
    status, fault, out, lse = call_decode(lib, step, scale=scale, num_splits=num_splits, vec_ok=vec_ok)
    assert status == 0, f"status {status}: {fault or 'the entry declined this configuration'}"
    (_check if step.dtype == torch.float32 else _check_bf16)(out, lse, ref, ref_lse)
    # The stored key must be bit-identical to what the unfused path (rotate, round, store) leaves.
    torch.testing.assert_close(step.k_buffer, want_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(step.v_buffer, want_v, rtol=0, atol=0, equal_nan=True)
    return out, lse


# (dtype, C, Hq, Hkv, Dqk, Dv, rotary_dim, num_splits)
CASES = [
    (torch.bfloat16, 150, 2, 2, 64, 64, 16, 1),  # no grouping, partial rotary, one split
    (torch.bfloat16, 120, 4, 2, 128, 128, 128, 3),  # G = 2, full rotary, d128 (two keys per lane)
    (torch.float16, 200, 8, 2, 32, 32, 0, 7),  # G = 4, no rotary, d32, more splits than some rows have keys for
    (torch.bfloat16, 130, 4, 2, 64, 32, 64, 3),  # Dqk != Dv, rotary over the whole of Dqk
    (torch.float16, 100, 6, 2, 40, 72, 24, 3),  # G = 3 (padded to 4), head dims short of their 128 tile
    (torch.bfloat16, 90, 8, 1, 64, 64, 32, 7),  # G = 8
    (torch.float32, 140, 4, 1, 64, 48, 16, 1),  # fp32: the algorithm to 1e-5
    (torch.float32, 110, 2, 2, 128, 128, 128, 7),
]


def _ids(case):
    dtype, *dims = case
    return f"{str(dtype)[6:]}-" + "-".join(map(str, dims))


def _bounds(capacity):
    """Per batch row: the usual step (the new key is the last one), left padding with the new key in the middle of
    the range, and a row whose position is outside its range (stored, not attended)."""
    kv_start = [0, 13, 5]
    kv_len = [capacity - 7, capacity - 30, capacity // 2]
    position = [capacity - 8, 40, capacity - 3]
    return kv_start, kv_len, position


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_decode_step_matches_oracle(lib, case):
    dtype, capacity, hq, hkv, dqk, dv, rotary_dim, num_splits = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    kv_start, kv_len, position = _bounds(capacity)
    step = Step(dtype=dtype, batch=3, capacity=capacity, hq=hq, hkv=hkv, dqk=dqk, dv=dv, rotary_dim=rotary_dim,
                kv_start=kv_start, kv_len=kv_len, position=position, gen=gen)  # fmt: skip
    assert step.vec_ok()  # head-major caches and fresh tensors: the vector loads
    run_and_check(lib, step, scale=dqk**-0.5, num_splits=num_splits)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_rows_at_the_edges(lib, num_splits):
    """A row that sees no key (zeros, lse -inf), positions outside [0, C) (nothing stored, the guard rows of the
    buffer stay NaN), a row that owns the whole cache, and bounds outside their range (clamped)."""
    gen = torch.Generator().manual_seed(num_splits)
    capacity = 80
    kv_start = [50, 0, 10, 0, -20]
    kv_len = [50, 79, 70, capacity, capacity + 40]
    position = [50, -1, capacity, capacity - 1, 3]
    step = Step(dtype=torch.bfloat16, batch=5, capacity=capacity, hq=4, hkv=2, dqk=64, dv=64, rotary_dim=16,
                kv_start=kv_start, kv_len=kv_len, position=position, gen=gen)  # fmt: skip
    out, lse = run_and_check(lib, step, scale=0.125, num_splits=num_splits)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0]).all()


def test_unaligned_caches_take_the_scalar_loads(lib):
    """Cache buffers one element off 16-byte alignment, and q, k_new, v_new as strided views of a packed projection:
    the scalar loads give the result of the vector loads on aligned copies (the shim faults on a misaligned vector
    load, which is what a host that wrongly claims alignment gets)."""
    args = dict(dtype=torch.bfloat16, batch=3, capacity=100, hq=4, hkv=2, dqk=64, dv=32, rotary_dim=64,
                kv_start=[0, 13, 5], kv_len=[93, 70, 50], position=[92, 40, 97], packed=True)  # fmt: skip
    unaligned = Step(**args, gen=torch.Generator().manual_seed(9), unaligned_cache=True)
    assert not unaligned.vec_ok()
    status, fault, _, _ = call_decode(lib, unaligned, scale=0.125, num_splits=1, vec_ok=True)
    assert status == 2 and "misaligned" in fault
    unaligned = Step(**args, gen=torch.Generator().manual_seed(9), unaligned_cache=True)
    out, lse = run_and_check(lib, unaligned, scale=0.125, num_splits=3)
    aligned = Step(**args, gen=torch.Generator().manual_seed(9))
    assert aligned.vec_ok()
    status, fault, aligned_out, aligned_lse = call_decode(lib, aligned, scale=0.125, num_splits=3)
    assert status == 0, fault
    assert torch.equal(out, aligned_out) and torch.equal(lse, aligned_lse)


def test_per_row_tensors_may_be_strided(lib):
    """One position for every row as an expanded tensor (stride 0), as the Python side passes an int position, and
    bounds sliced from larger tensors."""
    gen = torch.Generator().manual_seed(4)
    step = Step(dtype=torch.bfloat16, batch=3, capacity=90, hq=2, hkv=1, dqk=32, dv=32, rotary_dim=32,
                kv_start=[6, 6, 6], kv_len=[85, 60, 80], position=[70, 70, 70], gen=gen)  # fmt: skip
    step.position = torch.tensor([70], dtype=torch.int32).expand(3)
    step.kv_start = torch.tensor([6], dtype=torch.int32).expand(3)
    step.kv_len = torch.tensor([85, -1, 60, -1, 80, -1], dtype=torch.int32)[::2]
    assert [t.stride(0) for t in (step.position, step.kv_start, step.kv_len)] == [0, 0, 2]
    run_and_check(lib, step, scale=0.2, num_splits=3)


def test_entry_declines_what_the_launcher_declines(lib):
    """Group tiles and shared memory as the launcher and tests/kernels/test_cuda_build.py expect them; more than 8 q
    heads per kv head, head dims off multiples of 8, an odd or too wide rotary are declined (status 1)."""
    assert [lib.pf_shim_decode_group_tile(g) for g in range(1, 10)] == [1, 2, 4, 4, 8, 8, 8, 8, 0]
    for d in (32, 64, 128):
        for g in (1, 2, 4, 8):
            assert lib.pf_shim_decode_smem_bytes(d, g) == 2 * (g + 2) * d + 4 * 8 * g * (d + 2)
    assert lib.pf_shim_decode_smem_bytes(128, 8) <= 48 * 1024  # no opt-in needed
    gen = torch.Generator().manual_seed(0)
    base = dict(dtype=torch.bfloat16, batch=1, capacity=16, hq=2, hkv=1, dqk=64, dv=64, rotary_dim=16,
                kv_start=[0], kv_len=[16], position=[15], gen=gen)  # fmt: skip
    for change in (dict(hq=16), dict(dqk=60), dict(dv=136), dict(rotary_dim=15), dict(rotary_dim=72)):
        r = change.get("rotary_dim", 16)
        step = Step(**{**base, **change, "rotary_dim": r + r % 2})
        step.cos, step.sin = step.cos[:, :r].contiguous(), step.sin[:, :r].contiguous()
        status, *_ = call_decode(lib, step, scale=0.125, num_splits=1)
        assert status == 1, change


# How each broken variant (csrc/shim_attention.cpp) is caught: always by the values; the rotation also by the bits
# of the stored key.
BROKEN = {
    "rotary-sign-swapped": {"values", "cache"},  # the rotation's direction
    "reads-cache-at-position": {"values"},  # counts on another block's store (reads the stale NaN)
    "merge-without-rescale": {"values"},  # half-warps' parts merged without exp2(m_h - M)
    "split-ends-one-early": {"values"},  # an off-by-one in the split key ranges
}


@pytest.mark.parametrize("variant", BROKEN)
def test_shim_catches_a_broken_decode_kernel(lib, variant):
    def detected(name):
        gen = torch.Generator().manual_seed(21)
        step = Step(dtype=torch.bfloat16, batch=3, capacity=150, hq=4, hkv=2, dqk=64, dv=64, rotary_dim=64,
                    kv_start=[0, 13, 5], kv_len=[143, 120, 140], position=[142, 40, 139], gen=gen)  # fmt: skip
        want_k, _ = expected_buffers(step)
        ref, _ = oracle(step, 0.125)
        status, fault, out, _ = call_decode(lib, step, scale=0.125, num_splits=3, variant=name)
        assert status == 0, fault
        caught = set()
        rounding = (ref.to(torch.bfloat16).double() - ref).abs().max()
        if not ((out.double() - ref).abs().max() <= 2 * rounding + 1e-3):  # NaN counts as wrong
            caught.add("values")
        if not torch.equal(step.k_buffer.nan_to_num(), want_k.nan_to_num()):
            caught.add("cache")
        return caught

    assert detected("correct") == set()
    assert BROKEN[variant] <= detected(variant)


def test_scale_and_lse_units(lib):
    """lse is the natural log of the softmax denominator: one key with score 0 gives lse = 0 and out = v."""
    gen = torch.Generator().manual_seed(3)
    step = Step(dtype=torch.float32, batch=1, capacity=8, hq=1, hkv=1, dqk=32, dv=32, rotary_dim=0, kv_start=[4],
                kv_len=[5], position=[4], gen=gen)  # fmt: skip
    step.q.zero_()
    status, fault, out, lse = call_decode(lib, step, scale=1.0, num_splits=1)
    assert status == 0, fault
    assert torch.equal(out[0, 0, 0], step.v_new[0, 0, 0]) and float(lse) == 0.0
    step = Step(dtype=torch.float32, batch=1, capacity=8, hq=1, hkv=1, dqk=32, dv=32, rotary_dim=0, kv_start=[3],
                kv_len=[5], position=[4], gen=gen)  # fmt: skip
    step.q.zero_()
    _, _, _, lse = call_decode(lib, step, scale=1.0, num_splits=2)
    assert math.isclose(float(lse), math.log(2.0), rel_tol=1e-6)  # two keys with score 0
