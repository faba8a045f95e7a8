"""The CUDA device code run on the CPU: tiling, masking, online softmax, split-KV reduction, tensor-core fragments.

``csrc/shim_attention.cpp`` compiles the forward and combine kernels against ``csrc/cpu_shim.h`` (one
``std::thread`` per CUDA thread) with g++, in two forms: the SIMT tile on fp32, and the tensor-core tile on bf16
with ``mma.sync`` emulated per the PTX fragment layout (``csrc/cpu_mma.h``). They are called through ctypes and
compared with the float64 oracle. Not covered here: the real instruction, fp16, and the GPU launcher (GPU tests).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import zlib
from pathlib import Path

import pytest
import torch

from tests.oracle import attention_oracle, max_rel_error, random_bounds

CSRC = Path(__file__).resolve().parents[2] / "csrc"
CXX_FLAGS = ["-std=c++20", "-O2", "-shared", "-fPIC", "-pthread", "-Wall", "-Wextra", "-Werror"]


def _cache_dir() -> Path:
    """Compiled artifacts live in a temp dir keyed by the sources' hash, so a rerun with unchanged csrc/ is free."""
    digest = hashlib.sha256()
    for path in sorted(CSRC.glob("*")):
        if path.suffix in (".h", ".cuh", ".cpp"):
            digest.update(path.name.encode() + path.read_bytes())
    digest.update(" ".join(CXX_FLAGS).encode())
    return Path(tempfile.gettempdir()) / f"perceiver_fast_csrc-{os.getuid()}" / digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def shim() -> ctypes.CDLL:
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        pytest.skip("no C++ compiler (g++) to build the CPU shim")
    target = _cache_dir() / "shim_attention.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = target.with_suffix(f".{os.getpid()}.tmp")
        result = subprocess.run(
            [compiler, *CXX_FLAGS, "-o", str(scratch), str(CSRC / "shim_attention.cpp")],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, f"g++ failed:\n{result.stderr}"
        scratch.replace(target)  # atomic: a concurrent session never loads half a file
    lib = ctypes.CDLL(str(target))
    for entry in (lib.pf_shim_attention_f32_simt, lib.pf_shim_attention_bf16_mma):
        entry.restype = ctypes.c_int
        entry.argtypes = [ctypes.c_void_p] * 11 + [ctypes.c_float, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return lib


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def run_shim(lib, q, k, v, *, causal, kv_start, kv_len, scale, num_splits=1, vec_ok=False):
    """Call the shim ([B, N, H, D], last dim contiguous): fp32 runs the SIMT tile, bf16 the tensor-core tile."""
    batch, nq, hq, _ = q.shape
    dv = v.shape[3]
    entry = lib.pf_shim_attention_f32_simt if q.dtype == torch.float32 else lib.pf_shim_attention_bf16_mma
    # NaN: a row the kernel forgets to write fails the test.
    out = torch.full((batch, nq, hq, dv), float("nan"), dtype=q.dtype)
    lse = torch.full((batch, hq, nq), float("nan"))
    part_out = part_lse = None
    if num_splits > 1:
        part_out = torch.full((num_splits, batch, hq, nq, dv), float("nan"))
        part_lse = torch.full((num_splits, batch, hq, nq), float("nan"))
    strides = torch.tensor([s for t in (q, k, v, out) for s in t.stride()[:3]], dtype=torch.int64)
    dims = torch.tensor([batch, nq, k.shape[1], hq, k.shape[2], q.shape[3], dv], dtype=torch.int32)
    status = entry(
        *(_ptr(t) for t in (q, k, v, out, lse, part_out, part_lse, kv_start, kv_len, strides, dims)),
        scale,
        int(causal),
        num_splits,
        int(vec_ok),
    )
    assert status == 0, "unsupported head dims"
    return out, lse


# (batch, Nq, Nk, Hq, Hkv, Dqk, Dv, causal)
CASES = [
    (2, 70, 70, 2, 2, 32, 32, True),  # causal self-attention, two query tiles
    (2, 20, 150, 4, 2, 24, 40, True),  # prefix-causal, grouped heads, Dqk != Dv, a partial last key tile
    (1, 33, 64, 2, 1, 64, 48, False),  # non-causal cross-attention, multi-query
    (2, 80, 30, 2, 2, 16, 16, True),  # more queries than keys: the first rows see nothing
    (1, 5, 40, 3, 3, 72, 100, True),  # the 128 head-dim tile
]


def _inputs(case, *, generator):
    batch, nq, nk, hq, hkv, dqk, dv, _ = case
    q = torch.randn(batch, nq, hq, dqk, generator=generator)
    k = torch.randn(batch, nk, hkv, dqk, generator=generator)
    v = torch.randn(batch, nk, hkv, dv, generator=generator)
    return q, k, v


def _check(out, lse, ref, ref_lse):
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert max_rel_error(out, ref) < 1e-5
    assert torch.equal(torch.isneginf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], rtol=1e-5, atol=1e-5)
    # Rows that see no key are exact zeros, as the contract says.
    empty = torch.isinf(ref_lse).transpose(1, 2)  # [B, Nq, Hq]
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("bounds", ["none", "ragged+padded"])
def test_forward_matches_oracle(shim, case, bounds):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((case, bounds)).encode()))
    q, k, v = _inputs(case, generator=gen)
    batch, nk, causal = case[0], case[2], case[7]
    kv_start, kv_len = (None, None)
    if bounds != "none":
        kv_start, kv_len = random_bounds(batch, nk, generator=gen, allow_empty=True)
    scale = q.shape[3] ** -0.5
    out, lse = run_shim(shim, q, k, v, causal=causal, kv_start=kv_start, kv_len=kv_len, scale=scale)
    ref, ref_lse = attention_oracle(q, k, v, causal=causal, kv_start=kv_start, kv_len=kv_len, scale=scale)
    _check(out, lse, ref, ref_lse)


@pytest.mark.parametrize("num_splits", [2, 5])
@pytest.mark.parametrize("num_queries", [1, 3])
def test_split_kv_decode_matches_oracle(shim, num_splits, num_queries):
    """Decoding over a long cache: grouped heads packed into one tile, keys split, then the reduction pass."""
    gen = torch.Generator().manual_seed(num_splits * 10 + num_queries)
    batch, nk, hq, hkv, d = 3, 300, 8, 2, 64
    q = torch.randn(batch, num_queries, hq, d, generator=gen)
    k = torch.randn(batch, nk, hkv, d, generator=gen)
    v = torch.randn(batch, nk, hkv, d, generator=gen)
    # Row 0 holds a short prompt (most splits see nothing), row 1 is left-padded, row 2 uses the whole cache.
    kv_start = torch.tensor([0, 90, 0], dtype=torch.int32)
    kv_len = torch.tensor([37, 250, 300], dtype=torch.int32)
    out, lse = run_shim(
        shim, q, k, v, causal=True, kv_start=kv_start, kv_len=kv_len, scale=0.125, num_splits=num_splits
    )
    ref, ref_lse = attention_oracle(q, k, v, causal=True, kv_start=kv_start, kv_len=kv_len, scale=0.125)
    _check(out, lse, ref, ref_lse)


def test_split_kv_row_that_sees_nothing(shim):
    gen = torch.Generator().manual_seed(7)
    q, k, v = _inputs((2, 1, 200, 2, 1, 32, 32, True), generator=gen)
    kv_start = torch.tensor([200, 10], dtype=torch.int32)  # batch row 0 sees no key at all
    out, lse = run_shim(shim, q, k, v, causal=True, kv_start=kv_start, kv_len=None, scale=0.2, num_splits=3)
    ref, ref_lse = attention_oracle(q, k, v, causal=True, kv_start=kv_start, scale=0.2)
    _check(out, lse, ref, ref_lse)


def test_strided_inputs_and_wide_copies(shim):
    """Views of a packed qkv projection (head stride != head dim) and the 16-byte copy path give the same result."""
    gen = torch.Generator().manual_seed(3)
    batch, n, h, d = 2, 67, 2, 32
    qkv = torch.randn(batch, n, 3, h, d, generator=gen)
    q, k, v = qkv.unbind(dim=2)  # strides (n*3*h*d, 3*h*d, d): not contiguous
    kv_start, kv_len = random_bounds(batch, n, generator=gen)
    ref, ref_lse = attention_oracle(q, k, v, causal=True, kv_start=kv_start, kv_len=kv_len, scale=0.3)
    for vec_ok in (False, True):
        out, lse = run_shim(shim, q, k, v, causal=True, kv_start=kv_start, kv_len=kv_len, scale=0.3, vec_ok=vec_ok)
        _check(out, lse, ref, ref_lse)


def test_shim_catches_a_wrong_answer(shim):
    """The comparison can fail: a wrong scale is seen."""
    gen = torch.Generator().manual_seed(11)
    q, k, v = _inputs(CASES[0], generator=gen)
    out, _ = run_shim(shim, q, k, v, causal=True, kv_start=None, kv_len=None, scale=0.2)
    ref, _ = attention_oracle(q, k, v, causal=True, scale=0.25)
    assert max_rel_error(out, ref) > 1e-3


def _check_bf16(out, lse, ref, ref_lse):
    """flash-attn's rule for low precision: error vs float64 within twice that of rounding the exact result."""
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    rounding = (ref.to(torch.bfloat16).double() - ref).abs().max()
    assert (out.double() - ref).abs().max() <= 2 * rounding + 1e-3
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isneginf(lse), ~finite)
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], rtol=1e-3, atol=1e-3)


# The tensor-core tile: few, small cases (every emulated mma.sync costs two warp barriers on the CPU).
MMA_CASES = [
    (1, 20, 100, 2, 1, 40, 24, True),  # prefix-causal, grouped heads, Dqk != Dv, 64-wide tile with zero padding
    (1, 9, 70, 1, 1, 96, 128, False),  # the 128 tile, non-causal
]


@pytest.mark.parametrize("case", MMA_CASES, ids=lambda c: "-".join(map(str, c)))
def test_tensor_core_tile_matches_oracle_bf16(shim, case):
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    q, k, v = (t.to(torch.bfloat16) for t in _inputs(case, generator=gen))
    batch, nk, causal = case[0], case[2], case[7]
    kv_start, kv_len = random_bounds(batch, nk, generator=gen)
    for num_splits, vec_ok in ((1, False), (2, True)):  # also the 16-byte copies the GPU uses on aligned rows
        out, lse = run_shim(
            shim, q, k, v, causal=causal, kv_start=kv_start, kv_len=kv_len, scale=0.15, num_splits=num_splits,
            vec_ok=vec_ok,
        )  # fmt: skip
        ref, ref_lse = attention_oracle(q, k, v, causal=causal, kv_start=kv_start, kv_len=kv_len, scale=0.15)
        _check_bf16(out, lse, ref, ref_lse)


# --- keys a row does not have are never read (issue 11) ---
#
# Per the contract keys j < kv_start[b] and j >= kv_len[b] do not exist: a preallocated cache may hold anything there.
# The kernel multiplies whole 64-key tiles, so a key it merely masks still meets V in P·V, and 0 * NaN = NaN. These
# bounds make every row's first and last tiles straddle its [kv_start, kv_len) (Nk = 150, three tiles): left padding,
# ragged ends, a row that owns the whole cache and one that sees no key at all.
POISON_START = [5, 70, 0, 90]
POISON_LEN = [100, 131, 150, 90]

# (name, dtype, Nq, Hq, Hkv, Dqk, Dv, causal, num_splits)
POISON_CASES = [
    ("simt-causal", torch.float32, 20, 4, 2, 24, 40, True, 1),
    ("simt-cross", torch.float32, 33, 2, 1, 64, 48, False, 1),
    ("simt-decode-split", torch.float32, 1, 8, 2, 64, 64, True, 3),
    ("mma-causal", torch.bfloat16, 20, 2, 1, 40, 24, True, 1),
    ("mma-decode-split", torch.bfloat16, 3, 4, 1, 32, 32, True, 2),
    ("mma-cross-split", torch.bfloat16, 9, 2, 1, 64, 72, False, 2),
]


def _poison_outside(t, kv_start, kv_len, value):
    """A copy of k or v holding `value` at every key its batch row does not have."""
    t = t.clone()
    for b, (start, length) in enumerate(zip(kv_start.tolist(), kv_len.tolist())):
        t[b, :start] = value
        t[b, length:] = value
    return t


@pytest.mark.parametrize("fill", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("case", POISON_CASES, ids=lambda c: c[0])
def test_keys_outside_the_bounds_are_never_read(shim, case, fill):
    name, dtype, nq, hq, hkv, dqk, dv, causal, num_splits = case
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    batch, nk = len(POISON_LEN), 150
    q, k, v = (t.to(dtype) for t in _inputs((batch, nq, nk, hq, hkv, dqk, dv, causal), generator=gen))
    kv_start = torch.tensor(POISON_START, dtype=torch.int32)
    kv_len = torch.tensor(POISON_LEN, dtype=torch.int32)
    bad_k, bad_v = (_poison_outside(t, kv_start, kv_len, fill) for t in (k, v))
    out, lse = run_shim(
        shim, q, bad_k, bad_v, causal=causal, kv_start=kv_start, kv_len=kv_len, scale=0.2, num_splits=num_splits,
        vec_ok=True,
    )  # fmt: skip
    ref, ref_lse = attention_oracle(q, k, v, causal=causal, kv_start=kv_start, kv_len=kv_len, scale=0.2)
    (_check if dtype == torch.float32 else _check_bf16)(out, lse, ref, ref_lse)


# Bounds outside their range are not checked on the host for CUDA tensors (reading them back is a device sync), so
# the kernel clamps them: len = clamp(kv_len, 0, Nk), start = clamp(kv_start, 0, len). Per batch row, Nk = 150:
# "near" lies just outside the range, where an unclamped kernel would read the NaN guard rows around the keys (so
# the comparison sees it); "far" holds the int32 extremes, where it would read far outside any allocation.
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
OUT_OF_RANGE = {
    "near": ([0, -70, 120, -5, 30, 149], [190, 50, 80, -3, 151, 150]),
    "far": ([INT32_MIN, 0, INT32_MAX, -1, INT32_MIN, 10], [150, INT32_MAX, 20, INT32_MIN, INT32_MIN, INT32_MAX]),
}
# (name, dtype, Nq, causal, num_splits, which bounds are given): the clamp is the same code for every tile, so only
# the SIMT tile tries each bound alone (the other one defaulted).
CLAMP_PATHS = [
    ("simt-causal", torch.float32, 20, True, 1, "both"),
    ("simt-causal-start-only", torch.float32, 20, True, 1, "kv_start"),
    ("simt-causal-len-only", torch.float32, 20, True, 1, "kv_len"),
    ("simt-decode-split", torch.float32, 1, False, 3, "both"),
    ("mma-causal-split", torch.bfloat16, 5, True, 2, "both"),
]


def _guarded(t, guard):
    """`t` as a view into a buffer with `guard` NaN rows on either side of its key axis."""
    batch, n, heads, dim = t.shape
    buffer = torch.full((batch, n + 2 * guard, heads, dim), float("nan"), dtype=t.dtype)
    buffer[:, guard : guard + n] = t
    return buffer[:, guard : guard + n]


@pytest.mark.parametrize("bounds", OUT_OF_RANGE, ids=str)
@pytest.mark.parametrize("path", CLAMP_PATHS, ids=lambda c: c[0])
def test_out_of_range_bounds_act_as_clamped(shim, path, bounds):
    name, dtype, nq, causal, num_splits, given = path
    gen = torch.Generator().manual_seed(zlib.crc32(repr((name, bounds)).encode()))
    starts, lens = OUT_OF_RANGE[bounds]
    batch, nk = len(starts), 150
    q, k, v = (t.to(dtype) for t in _inputs((batch, nq, nk, 2, 1, 32, 32, causal), generator=gen))
    k, v = _guarded(k, 64), _guarded(v, 64)  # one tile either side: what an unclamped kernel would reach
    kv_len = torch.tensor(lens, dtype=torch.int32) if given != "kv_start" else None
    kv_start = torch.tensor(starts, dtype=torch.int32) if given != "kv_len" else None
    clamped_len = (kv_len if kv_len is not None else torch.full((batch,), nk, dtype=torch.int32)).clamp(0, nk)
    clamped_start = None if kv_start is None else kv_start.clamp(min=0).minimum(clamped_len)
    clamped_len = clamped_len if kv_len is not None else None

    args = dict(causal=causal, scale=0.2, num_splits=num_splits)
    out, lse = run_shim(shim, q, k, v, kv_start=kv_start, kv_len=kv_len, **args)
    want, want_lse = run_shim(shim, q, k, v, kv_start=clamped_start, kv_len=clamped_len, **args)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    ref, ref_lse = attention_oracle(q, k, v, causal=causal, kv_start=clamped_start, kv_len=clamped_len, scale=0.2)
    (_check if dtype == torch.float32 else _check_bf16)(out, lse, ref, ref_lse)
