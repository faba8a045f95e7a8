"""What only the GPU compiler sees, checked without a GPU: the kernels lower to sm_90 code that uses Hopper's
tensor-core instructions, pipelines its loads and does not spill.

Triton compiles for a target architecture without a device (``triton.compile(..., target=GPUTarget(...))``), which
catches errors the interpreter lets through (non-constexpr globals, dtype mismatches in the non-upcast path),
register spills, shared-memory overruns, and a tile that silently falls back from warpgroup MMA (``HGMMA``, sm_90's
tensor-core path) to Ampere's ``HMMA`` at well under half the rate. Kernels decorated under ``TRITON_INTERPRET=1``
cannot be compiled, so the compile runs once per module in a subprocess: bf16 and fp16, head dims 64 and 128, every
kernel with its default tile (32 variants: about 105 s on two busy cores with a cold Triton cache, 40 s when
``~/.triton/cache`` already holds them and only ``ptxas -v`` and ``cuobjdump`` run again).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")
from perceiver_fast.kernels.triton import config, forward  # noqa: E402

_SCRIPT = """
import json
from perceiver_fast.kernels.triton.compile_check import compile_variant, default_variants
for variant in default_variants(dtypes=("bf16", "fp16"), dims=(64, 128), fp32=False):
    report = compile_variant(variant, 90)
    fields = dict(name=variant.name, dtype=variant.dtype, dim=variant.constexprs.get("BLOCK_DV"), line=str(report),
                  warps=variant.num_warps, registers=report.registers, shared=report.shared_bytes,
                  spills=report.spill_bytes, fits_shared=report.fits_shared, wgmma=report.uses_wgmma,
                  pipelined=report.pipelined, sass=report.sass)
    print(json.dumps(fields), flush=True)
"""
_TENSOR_CORE_KERNELS = {"fwd", "fwd-split", "bwd_dq", "bwd_dkdv"}  # compute-bound: must use warpgroup MMA


@pytest.fixture(scope="module")
def sm90_reports() -> list[dict]:
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": os.getcwd()}
    result = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_every_kernel_compiles_for_sm90_without_spills(sm90_reports):
    names = {r["name"] for r in sm90_reports}
    assert names == {"fwd", "fwd-split", "decode", "decode-gqa", "combine", "bwd_delta", "bwd_dkdv", "bwd_dq"}
    assert {(r["dtype"], r["dim"]) for r in sm90_reports} == {(t, d) for t in ("bf16", "fp16") for d in (64, 128)}
    for r in sm90_reports:
        assert r["spills"] == 0, f"spills on sm_90: {r['line']}"
        assert r["fits_shared"], f"needs more shared memory than sm_90 has: {r['line']}"


def test_forward_and_backward_use_warpgroup_mma_with_pipelined_loads(sm90_reports):
    checked = [r for r in sm90_reports if r["name"] in _TENSOR_CORE_KERNELS]
    assert len(checked) == 2 * 2 * len(_TENSOR_CORE_KERNELS)
    for r in checked:
        assert r["wgmma"] and r["sass"]["HMMA"] == 0, f"not (only) warpgroup MMA on sm_90: {r['line']}"
        assert r["pipelined"], f"loads are not copied to shared memory asynchronously: {r['line']}"


def test_decoding_streams_the_cache_with_16_byte_copies_two_programs_per_sm(sm90_reports):
    """Decoding is bandwidth-bound: K/V must arrive in pipelined, vectorized copies, and the split count
    (``forward.decode_splits``) counts on two resident programs per SM (64K registers, 228 KiB of shared memory,
    registers allocated in steps of 8 per thread, 1 KiB of shared memory reserved per block)."""
    decode = [r for r in sm90_reports if r["name"].startswith("decode")]
    assert len(decode) == 2 * 2 * 2
    for r in decode:
        assert r["pipelined"], r["line"]
        assert r["sass"]["LDGSTS.128"] == r["sass"]["LDGSTS"], f"narrow copies of the cache: {r['line']}"
        registers = -(-r["registers"] // 8) * 8 * 32 * r["warps"]
        assert forward.DECODE_PROGRAMS_PER_SM * registers <= 64 * 1024, f"registers: {r['line']}"
        assert forward.DECODE_PROGRAMS_PER_SM * (r["shared"] + 1024) <= 228 * 1024, f"shared memory: {r['line']}"


def test_pruner_keeps_the_head_dim_row():
    """The autotuner hands constexprs passed by keyword in ``kwargs``; the pruner must find them there."""
    table = config.FORWARD_TILES
    every = [config.tile_config(t) for t in dict.fromkeys(t for row in table.values() for t in row)]
    prune = config.pruner(table)
    bf16 = {"Q": torch.empty(0, dtype=torch.bfloat16)}
    kept = prune(every, bf16, BLOCK_DQK=128, BLOCK_DV=64)
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) for c in kept] == [t[:3] for t in table[128]]
    fp32 = {"Q": torch.empty(0, dtype=torch.float32)}
    assert len(prune(every, fp32, BLOCK_DQK=64, BLOCK_DV=64)) == len(table["fp32"])  # fp32 has its own row


def test_pruner_takes_the_first_tile_when_not_tuning(monkeypatch):
    monkeypatch.setenv("PERCEIVER_FAST_TRITON_AUTOTUNE", "0")
    table = config.DQ_TILES
    every = [config.tile_config(t) for t in dict.fromkeys(t for row in table.values() for t in row)]
    kept = config.pruner(table)(every, {"Q": torch.empty(0, dtype=torch.float16)}, BLOCK_DQK=32, BLOCK_DV=16)
    assert len(kept) == 1 and kept[0].kwargs == {"BLOCK_M": table[64][0][0], "BLOCK_N": table[64][0][1]}


@pytest.mark.parametrize("tuning", ["1", "0"])
def test_a_row_patched_to_one_tile_prunes_to_it(tuning, monkeypatch):
    """How test_every_autotune_tile_matches_the_oracle_on_cuda forces a tile: its row, patched to that tile alone,
    prunes every candidate but it, tuning or not (the decode table's tiles have no BLOCK_M)."""
    monkeypatch.setenv("PERCEIVER_FAST_TRITON_AUTOTUNE", tuning)
    for table in (config.FORWARD_TILES, config.SPLIT_TILES, config.DKDV_TILES):
        every = [config.tile_config(t) for t in dict.fromkeys(t for row in table.values() for t in row)]
        forced = table[128][-1]
        monkeypatch.setitem(table, 128, [forced])
        (kept,) = config.pruner(table)(every, {"Q": torch.empty(0, dtype=torch.bfloat16)}, BLOCK_DQK=96, BLOCK_DV=96)
        assert (kept.kwargs, kept.num_warps, kept.num_stages) == (
            config.tile_config(forced).kwargs,
            forced[2],
            forced[3],
        )
