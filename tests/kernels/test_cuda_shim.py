"""The CUDA device code run on the CPU: tiling, masking, online softmax, split-KV reduction, tensor-core fragments,
the cp.async pipeline and the swizzled shared-memory layout of the fast kernel.

``csrc/shim_attention.cpp`` compiles the forward and combine kernels against ``csrc/cpu_shim.h`` (one
``std::thread`` per CUDA thread) with g++: the 64-row kernel with the SIMT tile on fp32 and with the tensor-core tile
on bf16, and the cp.async/ldmatrix kernel (``csrc/attention_flash.cuh``) on bf16 and fp16, with ``mma.sync``,
``ldmatrix`` and ``cp.async`` emulated per the PTX ISA (``csrc/cpu_mma.h``, ``csrc/cpu_shim.h``). A copy lands only at
the wait that retires its group, reads of undelivered shared memory are faults, and shared memory starts as NaN, so
pipeline mistakes show; deliberately broken configurations of the fast kernel check that they do. They are called
through ctypes and compared with the float64 oracle. Not covered here: the real instructions, timing, and the GPU
launcher (GPU tests).
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

from perceiver_fast.kernels import cuda
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
    common = [ctypes.c_void_p] * 11 + [ctypes.c_float, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    for entry in (lib.pf_shim_attention_f32_simt, lib.pf_shim_attention_bf16_mma):
        entry.restype = ctypes.c_int
        entry.argtypes = common
    lib.pf_shim_attention_flash.restype = ctypes.c_int
    lib.pf_shim_attention_flash.argtypes = common + [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.pf_shim_take_fault.restype = ctypes.c_int
    lib.pf_shim_take_fault.argtypes = [ctypes.c_char_p, ctypes.c_int]
    lib.pf_shim_take_ldmatrix_stats.argtypes = [ctypes.POINTER(ctypes.c_long)] * 2
    lib.pf_shim_flash_stages.argtypes = [ctypes.c_int]
    lib.pf_shim_flash_smem_bytes.restype = ctypes.c_long
    lib.pf_shim_flash_smem_bytes.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.pf_shim_ldmatrix.argtypes = [ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 3
    lib.pf_shim_flash_head_dim.argtypes = [ctypes.c_int] * 3
    take_fault(lib)  # a fresh start for this session
    return lib


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def take_fault(lib) -> str:
    """The misuse the emulation recorded since the last call (an address outside shared memory, a read of bytes a
    cp.async has not delivered, ...), or ''."""
    buffer = ctypes.create_string_buffer(1024)
    lib.pf_shim_take_fault(buffer, len(buffer))
    return buffer.value.decode()


def ldmatrix_stats(lib) -> tuple[int, int]:
    """(matrices read by the emulated ldmatrix, bank conflicts among them) since the last call."""
    matrices, conflicts = ctypes.c_long(), ctypes.c_long()
    lib.pf_shim_take_ldmatrix_stats(ctypes.byref(matrices), ctypes.byref(conflicts))
    return matrices.value, conflicts.value


# The fast kernel's broken configurations (csrc/shim_attention.cpp: enum Variant).
VARIANTS = {"correct": 0, "no-swizzle": 1, "v-read-unswizzled": 2, "wait-one-short": 3, "p-fragment-swapped": 4,
            "v-not-transposed": 5}  # fmt: skip


def call_shim(lib, q, k, v, *, causal, kv_start, kv_len, scale, num_splits=1, vec_ok=False, kernel=None, stages=2,
              variant="correct"):  # fmt: skip
    """Run a kernel on the shim ([B, N, H, D], last dim contiguous): ``(status, fault, out, lse)``.

    ``kernel``: "simt" (fp32), "mma" (bf16; the 64-row kernels) or "flash" (bf16/fp16, the cp.async/ldmatrix kernel,
    ``stages`` deep, ``variant`` one of VARIANTS); by default the first two by dtype.
    """
    batch, nq, hq, _ = q.shape
    dv = v.shape[3]
    kernel = kernel or ("simt" if q.dtype == torch.float32 else "mma")
    # NaN: a row the kernel forgets to write fails the test.
    out = torch.full((batch, nq, hq, dv), float("nan"), dtype=q.dtype)
    lse = torch.full((batch, hq, nq), float("nan"))
    part_out = part_lse = None
    if num_splits > 1:
        part_out = torch.full((num_splits, batch, hq, nq, dv), float("nan"))
        part_lse = torch.full((num_splits, batch, hq, nq), float("nan"))
    strides = torch.tensor([s for t in (q, k, v, out) for s in t.stride()[:3]], dtype=torch.int64)
    dims = torch.tensor([batch, nq, k.shape[1], hq, k.shape[2], q.shape[3], dv], dtype=torch.int32)
    args = (
        *(_ptr(t) for t in (q, k, v, out, lse, part_out, part_lse, kv_start, kv_len, strides, dims)),
        scale, int(causal), num_splits, int(vec_ok),
    )  # fmt: skip
    if kernel == "flash":
        assert q.dtype in (torch.bfloat16, torch.float16)
        dtype = 0 if q.dtype == torch.bfloat16 else 1
        status = lib.pf_shim_attention_flash(*args, dtype, stages, VARIANTS[variant])
    else:
        assert q.dtype == (torch.float32 if kernel == "simt" else torch.bfloat16)
        status = (lib.pf_shim_attention_f32_simt if kernel == "simt" else lib.pf_shim_attention_bf16_mma)(*args)
    return status, take_fault(lib), out, lse


def run_shim(lib, q, k, v, **kwargs):
    """call_shim for a run that must succeed: ``(out, lse)``."""
    status, fault, out, lse = call_shim(lib, q, k, v, **kwargs)
    assert status != 1, "the entry does not take these head dims / this configuration"
    assert status == 0, f"the emulation recorded a fault: {fault}"
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
    """flash-attn's rule for low precision (bf16 or fp16 `out`): error vs float64 within twice that of rounding the
    exact result to out's dtype."""
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    rounding = (ref.to(out.dtype).double() - ref).abs().max()
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


# --- the cp.async/ldmatrix kernel (csrc/attention_flash.cuh) ---


@pytest.mark.parametrize("trans", [False, True], ids=["plain", "trans"])
@pytest.mark.parametrize("num", [1, 2, 4])
def test_ldmatrix_emulation_follows_the_ptx_layout(shim, num, trans):
    """ldmatrix.m8n8.x{1,2,4}[.trans]: lane 8m + r names row r of matrix m; register m of lane 4g + t receives
    M_m[g][2t], M_m[g][2t+1] (with .trans M_m[2t][g], M_m[2t+1][g]), the lower element in the low 16 bits."""
    rows = torch.arange(32 * 8, dtype=torch.int16).reshape(32, 8)  # distinct values: a misplaced one is seen
    # Lanes name rows in a scrambled order; lanes past 8 * num name rows too, which must be ignored.
    row_of_lane = torch.randperm(32, generator=torch.Generator().manual_seed(num)).to(torch.int32)
    out = torch.zeros(32, 4, dtype=torch.int64).to(torch.int32)
    assert shim.pf_shim_ldmatrix(num, int(trans), rows.data_ptr(), row_of_lane.data_ptr(), out.data_ptr()) == 0
    assert take_fault(shim) == ""
    values = rows.to(torch.int64) & 0xFFFF
    for lane in range(32):
        g, t = divmod(lane, 4)
        for m in range(num):
            matrix = values[row_of_lane[8 * m : 8 * m + 8].long()]  # [8 rows][8 columns]
            lo, hi = (matrix[2 * t, g], matrix[2 * t + 1, g]) if trans else (matrix[g, 2 * t], matrix[g, 2 * t + 1])
            assert int(out[lane, m]) & 0xFFFFFFFF == int(lo) | (int(hi) << 16), (lane, m)
    ldmatrix_stats(shim)


def test_fast_path_is_chosen_where_python_expects_it(shim):
    """The library runs the fast kernel exactly where cuda.block_rows says 128-row blocks (the split-KV choice)."""
    for dqk, dv in [(16, 32), (32, 32), (33, 8), (40, 72), (64, 64), (64, 128), (128, 96), (100, 128), (136, 64)]:
        for aligned in (False, True):
            flash = shim.pf_shim_flash_head_dim(dqk, dv, int(aligned)) != 0
            if max(dqk, dv) <= cuda.MAX_HEAD_DIM:
                expected = cuda.FLASH_BLOCK_M if flash else cuda.BLOCK_M
                assert cuda.block_rows(dqk, dv, aligned=aligned) == expected, (dqk, dv, aligned)
            else:
                assert not flash


def test_fast_kernel_fits_shared_memory_on_every_sm80_class_gpu(shim):
    """The launcher's pipeline depths: d64 three stages, two blocks per SM in an A100's 164 KiB; d128 two stages,
    within the 99 KiB an sm_86/sm_89 block may have (H100: 227 KiB)."""
    sizes = {d: (shim.pf_shim_flash_stages(d), shim.pf_shim_flash_smem_bytes(d, shim.pf_shim_flash_stages(d)))
             for d in (64, 128)}  # fmt: skip
    assert sizes == {64: (3, 64 * 1024), 128: (2, 96 * 1024)}
    assert 2 * sizes[64][1] <= 164 * 1024
    assert all(smem <= 99 * 1024 for _, smem in sizes.values())


# (batch, Nq, Nk, Hq, Hkv, Dqk, Dv, causal, dtype, stages, num_splits): few, small cases (the fast kernel's blocks
# have 256 threads and every emulated mma.sync/ldmatrix costs two warp barriers on the CPU).
FLASH_CASES = [
    # causal self-attention, two query blocks: the first has only diagonal tiles (masked; its upper warps skip the
    # second), the second starts with unmasked tiles and has 6 warps without rows
    (1, 150, 150, 1, 1, 64, 64, True, torch.bfloat16, 3, 1),
    # prefix-causal, grouped heads packed into the rows, Dqk != Dv in the 128 tile
    (2, 70, 160, 4, 2, 40, 72, True, torch.bfloat16, 2, 1),
    # non-causal cross-attention, fp16, split-KV with the reduction pass
    (1, 9, 100, 2, 2, 128, 96, False, torch.float16, 2, 2),
    # more queries than keys: the first rows see nothing; fp16, three stages
    (1, 80, 30, 2, 1, 64, 64, True, torch.float16, 3, 1),
]


def _flash_ids(case):
    *dims, dtype, stages, splits = case
    return "-".join(map(str, dims)) + f"-{str(dtype)[6:]}-s{stages}-x{splits}"


@pytest.mark.parametrize("case", FLASH_CASES, ids=_flash_ids)
@pytest.mark.parametrize("bounds", ["none", "ragged+padded"])
def test_fast_kernel_matches_oracle(shim, case, bounds):
    batch, nq, nk, hq, hkv, dqk, dv, causal, dtype, stages, num_splits = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr((case, bounds)).encode()))
    q, k, v = (t.to(dtype) for t in _inputs(case[:8], generator=gen))
    kv_start = kv_len = None
    if bounds != "none":
        kv_start, kv_len = random_bounds(batch, nk, generator=gen, allow_empty=True)
    ldmatrix_stats(shim)
    out, lse = run_shim(
        shim, q, k, v, causal=causal, kv_start=kv_start, kv_len=kv_len, scale=0.15, num_splits=num_splits,
        vec_ok=True, kernel="flash", stages=stages,
    )  # fmt: skip
    ref, ref_lse = attention_oracle(q, k, v, causal=causal, kv_start=kv_start, kv_len=kv_len, scale=0.15)
    _check_bf16(out, lse, ref, ref_lse)
    empty = torch.isinf(ref_lse).transpose(1, 2)
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    matrices, conflicts = ldmatrix_stats(shim)
    assert matrices > 0 and conflicts == 0, "the swizzled tiles must be read without bank conflicts"


def test_fast_kernel_partial_chunks_of_odd_head_dims(shim):
    """Head dims that are not multiples of 8, as aligned views of wider rows: the last 16-byte copy of a row reads
    only its src-size bytes (the NaN beyond must not come in) and zero-fills the rest."""
    gen = torch.Generator().manual_seed(5)
    batch, nq, nk, hq, dqk, dv = 2, 33, 90, 2, 36, 100

    def view(n, d):  # rows padded to the next multiple of 8 with NaN
        buffer = torch.full((batch, n, hq, (d + 7) // 8 * 8), float("nan"), dtype=torch.bfloat16)
        buffer[..., :d] = torch.randn(batch, n, hq, d, generator=gen)
        return buffer[..., :d]

    q, k, v = view(nq, dqk), view(nk, dqk), view(nk, dv)
    kv_start, kv_len = random_bounds(batch, nk, generator=gen)
    assert shim.pf_shim_flash_head_dim(dqk, dv, 1) == 128
    out, lse = run_shim(
        shim, q, k, v, causal=True, kv_start=kv_start, kv_len=kv_len, scale=0.2, vec_ok=True, kernel="flash"
    )
    ref, ref_lse = attention_oracle(q, k, v, causal=True, kv_start=kv_start, kv_len=kv_len, scale=0.2)
    _check_bf16(out, lse, ref, ref_lse)


@pytest.mark.parametrize("num_queries", [1, 3])
def test_fast_kernel_split_kv_decode(shim, num_queries):
    """Decoding with 8 q heads per kv head: one 128-row block holds 8 or 24 real rows (the other warps only help
    to copy), keys split three ways, one row with most splits empty, one left-padded."""
    gen = torch.Generator().manual_seed(num_queries)
    batch, nk, hq, hkv, d = 3, 300, 8, 1, 64
    q = torch.randn(batch, num_queries, hq, d, generator=gen).bfloat16()
    k = torch.randn(batch, nk, hkv, d, generator=gen).bfloat16()
    v = torch.randn(batch, nk, hkv, d, generator=gen).bfloat16()
    kv_start = torch.tensor([0, 90, 0], dtype=torch.int32)
    kv_len = torch.tensor([37, 250, 300], dtype=torch.int32)
    out, lse = run_shim(
        shim, q, k, v, causal=True, kv_start=kv_start, kv_len=kv_len, scale=0.125, num_splits=3, vec_ok=True,
        kernel="flash", stages=3,
    )  # fmt: skip
    ref, ref_lse = attention_oracle(q, k, v, causal=True, kv_start=kv_start, kv_len=kv_len, scale=0.125)
    _check_bf16(out, lse, ref, ref_lse)


def test_fast_kernel_takes_only_what_the_launcher_sends_it(shim):
    q = torch.randn(1, 4, 1, 32).bfloat16()
    status, *_ = call_shim(shim, q, q, q, causal=False, kv_start=None, kv_len=None, scale=1.0, vec_ok=True,
                           kernel="flash")  # fmt: skip
    assert status == 1  # head dim 32: the 64-row kernel's
    q = torch.randn(1, 4, 1, 64).bfloat16()
    status, *_ = call_shim(shim, q, q, q, causal=False, kv_start=None, kv_len=None, scale=1.0, vec_ok=False,
                           kernel="flash")  # fmt: skip
    assert status == 1  # rows not 16-byte aligned: no cp.async


# How each broken configuration of csrc/shim_attention.cpp must be caught: "values" (differs from the oracle),
# "fault" (the emulation saw a read of undelivered shared memory, ...), "conflicts" (ldmatrix bank conflicts).
BROKEN = {
    "no-swizzle": {"conflicts"},  # a consistent plain layout is right, only slow
    "v-read-unswizzled": {"values"},  # reader and writer disagree on the swizzle
    "wait-one-short": {"fault"},  # a missing cp.async wait / a pipeline one group too deep
    "p-fragment-swapped": {"values"},  # a wrong S -> A fragment mapping
    "v-not-transposed": {"values"},  # a wrong B fragment (ldmatrix without .trans)
}


@pytest.mark.parametrize("variant", BROKEN)
def test_shim_catches_a_broken_fast_kernel(shim, variant):
    gen = torch.Generator().manual_seed(13)
    case = (1, 40, 150, 2, 1, 64, 64, True)
    q, k, v = (t.to(torch.bfloat16) for t in _inputs(case, generator=gen))
    kv_start, kv_len = torch.tensor([10], dtype=torch.int32), torch.tensor([140], dtype=torch.int32)
    ref, _ = attention_oracle(q, k, v, causal=True, kv_start=kv_start, kv_len=kv_len, scale=0.15)
    args = dict(causal=True, kv_start=kv_start, kv_len=kv_len, scale=0.15, vec_ok=True, kernel="flash", stages=2)

    def detected(name):
        ldmatrix_stats(shim)
        status, fault, out, _ = call_shim(shim, q, k, v, variant=name, **args)
        assert status in (0, 2)
        caught = set()
        if status == 2:
            assert fault
            caught.add("fault")
        rounding = (ref.to(torch.bfloat16).double() - ref).abs().max()
        if not ((out.double() - ref).abs().max() <= 2 * rounding + 1e-3):  # NaN counts as wrong
            caught.add("values")
        if ldmatrix_stats(shim)[1] > 0:
            caught.add("conflicts")
        return caught

    assert detected("correct") == set()
    assert BROKEN[variant] <= detected(variant)


# --- keys a row does not have are never read (issue 11) ---
#
# Per the contract keys j < kv_start[b] and j >= kv_len[b] do not exist: a preallocated cache may hold anything there.
# The kernel multiplies whole 64-key tiles, so a key it merely masks still meets V in P·V, and 0 * NaN = NaN. These
# bounds make every row's first and last tiles straddle its [kv_start, kv_len) (Nk = 150, three tiles): left padding,
# ragged ends, a row that owns the whole cache and one that sees no key at all.
POISON_START = [5, 70, 0, 90]
POISON_LEN = [100, 131, 150, 90]

# (name, dtype, Nq, Hq, Hkv, Dqk, Dv, causal, num_splits); the name starts with the kernel (see call_shim).
POISON_CASES = [
    ("simt-causal", torch.float32, 20, 4, 2, 24, 40, True, 1),
    ("simt-cross", torch.float32, 33, 2, 1, 64, 48, False, 1),
    ("simt-decode-split", torch.float32, 1, 8, 2, 64, 64, True, 3),
    ("mma-causal", torch.bfloat16, 20, 2, 1, 40, 24, True, 1),
    ("mma-decode-split", torch.bfloat16, 3, 4, 1, 32, 32, True, 2),
    ("mma-cross-split", torch.bfloat16, 9, 2, 1, 64, 72, False, 2),
    # the cp.async copies: rows outside the bounds and columns past Dqk/Dv are zero-filled by src-size, not read
    ("flash-causal", torch.bfloat16, 20, 4, 2, 40, 72, True, 1),
    ("flash-decode-split", torch.float16, 1, 8, 2, 64, 64, True, 3),
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
        vec_ok=True, kernel=name.split("-")[0],
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
# (name, dtype, Nq, causal, num_splits, which bounds are given, head dim): the clamp is the same code for every
# tile, so only the SIMT tile tries each bound alone (the other one defaulted).
CLAMP_PATHS = [
    ("simt-causal", torch.float32, 20, True, 1, "both", 32),
    ("simt-causal-start-only", torch.float32, 20, True, 1, "kv_start", 32),
    ("simt-causal-len-only", torch.float32, 20, True, 1, "kv_len", 32),
    ("simt-decode-split", torch.float32, 1, False, 3, "both", 32),
    ("mma-causal-split", torch.bfloat16, 5, True, 2, "both", 32),
    ("flash-causal-split", torch.bfloat16, 5, True, 2, "both", 64),
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
    name, dtype, nq, causal, num_splits, given, head_dim = path
    gen = torch.Generator().manual_seed(zlib.crc32(repr((name, bounds)).encode()))
    starts, lens = OUT_OF_RANGE[bounds]
    batch, nk = len(starts), 150
    q, k, v = (t.to(dtype) for t in _inputs((batch, nq, nk, 2, 1, head_dim, head_dim, causal), generator=gen))
    k, v = _guarded(k, 64), _guarded(v, 64)  # one tile either side: what an unclamped kernel would reach
    kv_len = torch.tensor(lens, dtype=torch.int32) if given != "kv_start" else None
    kv_start = torch.tensor(starts, dtype=torch.int32) if given != "kv_len" else None
    clamped_len = (kv_len if kv_len is not None else torch.full((batch,), nk, dtype=torch.int32)).clamp(0, nk)
    clamped_start = None if kv_start is None else kv_start.clamp(min=0).minimum(clamped_len)
    clamped_len = clamped_len if kv_len is not None else None

    kernel = name.split("-")[0]
    args = dict(causal=causal, scale=0.2, num_splits=num_splits, kernel=kernel, vec_ok=kernel == "flash")
    out, lse = run_shim(shim, q, k, v, kv_start=kv_start, kv_len=kv_len, **args)
    want, want_lse = run_shim(shim, q, k, v, kv_start=clamped_start, kv_len=clamped_len, **args)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    ref, ref_lse = attention_oracle(q, k, v, causal=causal, kv_start=clamped_start, kv_len=clamped_len, scale=0.2)
    (_check if dtype == torch.float32 else _check_bf16)(out, lse, ref, ref_lse)
