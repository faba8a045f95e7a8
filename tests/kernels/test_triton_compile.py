"""What only the GPU compiler sees, checked without a GPU: the kernels lower to sm_90 code without spills.

Triton compiles for a target architecture without a device (``triton.compile(..., target=GPUTarget(...))``), which
catches errors the interpreter lets through (non-constexpr globals, dtype mismatches in the non-upcast path) and
register spills. Kernels decorated under ``TRITON_INTERPRET=1`` cannot be compiled, so this runs in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")
from perceiver_fast.kernels.triton import config  # noqa: E402

_SCRIPT = """
from perceiver_fast.kernels.triton.compile_check import compile_variant, default_variants
for variant in default_variants(dtypes=("bf16",), dims=(64, 128), fp32=False):
    report = compile_variant(variant, 90)
    print(report.variant.kernel, report.variant.constexprs.get("BLOCK_DQK", report.variant.constexprs.get("BLOCK_DV")),
          report.variant.constexprs.get("NUM_SPLITS", 1), report.spill_bytes, report.shared_bytes, flush=True)
"""


def test_kernels_compile_for_sm90_without_spills():
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": os.getcwd()}
    result = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line.split() for line in result.stdout.splitlines()]
    kernels = {line[0] for line in lines}
    assert kernels == {"fwd", "combine", "bwd_delta", "bwd_dkdv", "bwd_dq"}
    for kernel, dim, splits, spills, shared in lines:
        assert int(spills) == 0, f"{kernel} (head dim {dim}, splits {splits}) spills {spills} bytes on sm_90"
        assert int(shared) <= 227 * 1024, f"{kernel} needs {shared} bytes of shared memory"


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
