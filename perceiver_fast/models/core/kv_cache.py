"""A preallocated key/value cache owned by one attention layer (gpt-fast's pattern).

The buffers are allocated once per batch, head-major (each head's keys contiguous, which the attention kernels read
fastest; keys and values of equal head dims in one buffer, each row's value heads after its key heads), and exposed
as ``[batch, capacity, heads, head_dim]`` views, the layout of the attention op. New keys and
values are written in place, at positions given either as a Python int (eager code) or as a device tensor (code
captured in a CUDA graph, whose positions must change from one replay to the next without a host round trip).
Which positions hold what is the business of whoever drives the cache (generation keeps the window logic).
"""

from __future__ import annotations

import torch

from perceiver_fast.kernels.cache_write import cache_pairs, write_rows
from perceiver_fast.models.core.packed import PackedQKV


class KVCache:
    """Keys ``[B, capacity, H, Dk]`` and values ``[B, capacity, H, Dv]`` of one attention layer."""

    def __init__(
        self,
        batch: int,
        capacity: int,
        heads: int,
        k_dim: int,
        v_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        if batch < 1 or capacity < 1:
            raise ValueError(f"a cache needs batch >= 1 and capacity >= 1, got {batch} and {capacity}")
        # torch.empty on purpose: positions that hold nothing are never read (the op's key bounds exclude them).
        if k_dim == v_dim:
            # One buffer, each row's value heads after its key heads: keys and values projected by one GEMM are
            # written with one copy (kernels/cache_write.py); the attention kernels read any batch stride.
            both = torch.empty(batch, 2 * heads, capacity, k_dim, dtype=dtype, device=device).transpose(1, 2)
            self.k, self.v = both[:, :, :heads], both[:, :, heads:]
        else:
            self.k = torch.empty(batch, heads, capacity, k_dim, dtype=dtype, device=device).transpose(1, 2)
            self.v = torch.empty(batch, heads, capacity, v_dim, dtype=dtype, device=device).transpose(1, 2)
        # The layer's query/key/value rows in a decoder's packed copy (see packed.py), which that decoder refreshes
        # before each step; None: the layer projects with its own modules.
        self.packed: PackedQKV | None = None

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def write(self, position: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k, v`` ``[B, n, H, D]`` at positions ``position .. position + n - 1``.

        ``position`` is a Python int, or a 0-d / ``[1]`` integer tensor on the cache's device (read by the kernels,
        never by the host), or an ``[n]`` tensor of positions, one per new row.
        """
        n = k.shape[1]
        pairs = cache_pairs(self.k, self.v, k, v)  # one copy where keys and values come out of one GEMM
        if isinstance(position, int):
            for cache, new in pairs:
                cache[:, position : position + n] = new
            return
        index = position.reshape(-1).to(torch.int64)
        if index.numel() == 1 and n > 1:
            index = index + torch.arange(n, device=index.device)
        for cache, new in pairs:
            write_rows(cache, index, new.to(cache.dtype))

    def move(self, source: int, target: int, count: int) -> None:
        """Copy positions ``[source, source + count)`` to ``[target, target + count)`` (they may overlap)."""
        if count <= 0 or source == target:
            return
        for buffer in (self.k, self.v):
            buffer[:, target : target + count] = buffer[:, source : source + count].clone()

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The two buffers (for checks that nothing was reallocated)."""
        return self.k, self.v
