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


# The tensor-core tile: few, small cases (every emulated mma.sync costs two warp barriers on the CPU).
MMA_CASES = [
    (1, 20, 100, 2, 1, 40, 24, True),  # prefix-causal, grouped heads, Dqk != Dv, 64-wide tile with zero padding
    (1, 9, 70, 1, 1, 96, 128, False),  # the 128 tile, non-causal
]


@pytest.mark.parametrize("case", MMA_CASES, ids=lambda c: "-".join(map(str, c)))
def test_tensor_core_tile_matches_oracle_bf16(shim, case):
    """flash-attn's rule for low precision: error vs float64 within twice that of rounding the exact result."""
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
        rounding = (ref.to(torch.bfloat16).double() - ref).abs().max()
        assert (out.double() - ref).abs().max() <= 2 * rounding + 1e-3, num_splits
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isneginf(lse), ~finite)
        torch.testing.assert_close(lse[finite].double(), ref_lse[finite], rtol=1e-3, atol=1e-3)
