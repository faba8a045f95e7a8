"""Launch settings shared by the forward and backward kernels: tile sizes and autotune configs.

Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors through Triton's interpreter. There autotuning with more
than one config fails and bf16 arithmetic is wrong, so one fixed config is used and operands are upcast to fp32.
"""

from __future__ import annotations

import functools

import torch
import triton

from perceiver_fast.kernels.triton.env import autotuning, interpreting


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for the host's launch arithmetic.

    ``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions in Triton 3.9: callable from the host, but
    each call unwraps its arguments first, a few microseconds apiece, and a launch asked for about ten of them."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` (0 for 0, as Triton's), for the host; see :func:`cdiv`."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def head_block(head_dim: int) -> int:
    """Tile width for a head dim: the next power of two (at least 16, what ``tl.dot`` needs); the pad is masked."""
    return max(16, next_power_of_2(head_dim))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get full-precision products (the contract promises fp32 accuracy, tf32 would give ~1e-3)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def length_bucket(n: int) -> int:
    """Autotune key for a sequence length: its power-of-two bucket, so decoding steps do not each re-tune."""
    return next_power_of_2(max(n, 1))


@functools.lru_cache(maxsize=8)
def num_sms(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (cached; the query is slow)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# Tiles per head-dim class (the widest padded head dim: 64, 128 or 256; fp32 inputs have their own row), as
# (BLOCK_M, BLOCK_N, warps, stages). The first of each list is the one used when autotuning is off
# (PERCEIVER_FAST_TRITON_AUTOTUNE=0, which the GPU tests set to compile less) and the one the compile check reports
# on; the autotuner picks among the rest on the GPU.
#
# Chosen without a GPU (speed on sm_90 is still to be measured) with `python -m
# perceiver_fast.kernels.triton.compile_check` and sweeps of the same compile, under both Triton 3.6 (the GPU
# machines') and 3.9, for bf16 and fp16 on sm_90: every fp16/bf16 tile at head dims 64 and 128 below compiles to
# warpgroup MMA (HGMMA, no HMMA left), copies its loads with 16-byte cp.async (pipelined over `stages` buffers),
# does not spill, and fits in shared memory. Among those, the defaults are the tutorial's and FlashAttention's
# shapes for Hopper: 64 rows per warpgroup, so 128-row tiles take 8 warps; key blocks of 64-128 with 3 stages where
# shared memory allows. Forward, D128: 128x128 with 3 stages needs 224 KiB of the 227, at 254-255 registers, so the
# default is 128x64 with 3 stages (128 KiB, ~220 registers); 128x128 with 2 stages stays in the list. Backward: dk/dv
# programs own a key block (BLOCK_N rows of every product, see backward.py) and step BLOCK_M queries; 128 keys per
# program halve the q/dO traffic but reach 252-255 registers at D128, so D128 defaults to 64 keys. dq programs own
# 128 query rows. At 256 nothing compiled without spills and the least-spilling tile is listed. fp32
# (full-precision products, a correctness path, no tensor cores) needs small tiles: these do not spill at 64 or 128.
FORWARD_TILES = {
    64: [(128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
    128: [(128, 64, 8, 3), (128, 128, 8, 2), (128, 32, 8, 2)],
    256: [(64, 32, 8, 2)],
    "fp32": [(32, 16, 8, 2)],
}
# Decoding (BLOCK_M is fixed by the caller, 16 to 64 rows; listed as None) is bandwidth-bound: HMMA is fine at 16
# or 32 rows, and what matters is bytes in flight. 3 stages keep two K/V blocks in flight per program; 4 warps keep
# even a 64-row tile (252-255 registers, <= 112 KiB of shared memory) at two resident programs per SM, which
# forward.decode_splits counts on. Every tile holds 64 packed rows without spilling.
SPLIT_TILES = {
    64: [(None, 128, 4, 3), (None, 64, 4, 3)],
    128: [(None, 64, 4, 3), (None, 64, 4, 2)],
    256: [(None, 64, 8, 2)],
    "fp32": [(None, 16, 8, 2)],  # spills 16 bytes at D64 with 64 rows; the rest of fp32 decoding does not spill
}
DQ_TILES = {
    64: [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)],
    128: [(128, 64, 8, 2), (64, 64, 8, 2), (64, 32, 8, 2)],
    256: [(32, 16, 4, 1)],
    "fp32": [(32, 16, 8, 2)],
}
DKDV_TILES = {  # (query rows per step, keys per program, warps, stages)
    64: [(32, 128, 8, 2), (32, 64, 8, 2), (32, 64, 4, 2)],
    128: [(32, 64, 8, 2), (32, 128, 8, 2)],
    256: [(32, 16, 4, 1)],
    "fp32": [(16, 16, 4, 2)],
}
_INTERPRETER_TILE = (32, 32, 1, 1)  # large tiles are far cheaper there; 32 still spreads test shapes over blocks


def head_class(block_dqk: int, block_dv: int, fp32: bool = False) -> int | str:
    """The tile table row for padded head dims (``"fp32"`` for fp32 inputs, whose operands take twice the room)."""
    if fp32:
        return "fp32"
    widest = max(block_dqk, block_dv)
    return 64 if widest <= 64 else 128 if widest <= 128 else 256


def tile_config(tile: tuple) -> triton.Config:
    block_m, block_n, warps, stages = tile
    kwargs = {"BLOCK_N": block_n} if block_m is None else {"BLOCK_M": block_m, "BLOCK_N": block_n}
    return triton.Config(kwargs, num_warps=warps, num_stages=stages)


def configs(table: dict[int | str, list[tuple]]) -> list[triton.Config]:
    """Every tile of a table as autotune configs (one fixed tile under the interpreter)."""
    if interpreting():
        block_m = None if all(t[0] is None for tiles in table.values() for t in tiles) else _INTERPRETER_TILE[0]
        return [tile_config((block_m, *_INTERPRETER_TILE[1:]))]
    tiles = list(dict.fromkeys(t for tiles in table.values() for t in tiles))
    return [tile_config(t) for t in tiles]


def pruner(table: dict[int | str, list[tuple]]):
    """An ``early_config_prune`` keeping the tiles of the call's head-dim class (only the first when not tuning)."""

    def prune(all_configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        if len(all_configs) == 1:
            return all_configs
        args = {**named_args, **kwargs}  # the autotuner passes constexprs given by keyword in kwargs
        row = table[head_class(args["BLOCK_DQK"], args["BLOCK_DV"], args["Q"].dtype == torch.float32)]
        wanted = [tile_config(t) for t in (row if autotuning() else row[:1])]
        keys = {(tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages) for c in wanted}
        return [c for c in all_configs if (tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages) in keys]

    return prune
