"""New key/value rows into a key/value cache in one copy where the layouts allow, two otherwise.

A decoding step is bound by kernel launches. Keys and values projected by one GEMM come out side by side (the heads
of the values right after those of the keys, at the same strides), and a cache allocated as one buffer holds its
keys' and values' heads the same way: then the keys and values are one ``[B, N, 2H, D]`` tensor on each side, and a
single copy writes both.

Under ``torch.compile`` the rows go in through ``index_put_``, which inductor writes in place into a strided cache;
an ``index_copy_`` into the same view is functionalized into a copy of the whole cache per write.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake


def heads_joined(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """``[B, N, 2H, D]``: ``a`` and ``b`` (``[B, N, H, D]`` each) as one tensor, where ``b``'s heads follow ``a``'s in
    memory at the same strides; else ``None``."""
    if a.dim() != 4 or a.shape != b.shape or a.stride() != b.stride() or (a.dtype, a.device) != (b.dtype, b.device):
        return None
    if torch.compiler.is_compiling() or is_fake(a):  # traced: no memory to compare
        return None
    # Addresses first (cheap), then whether both are one allocation (two may happen to lie side by side).
    if b.data_ptr() != a.data_ptr() + a.shape[2] * a.stride(2) * a.element_size():
        return None
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return None
    batch, rows, heads, dim = a.shape
    return a.as_strided((batch, rows, 2 * heads, dim), a.stride(), a.storage_offset())


def cache_pairs(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The ``(cache, rows)`` pairs that writing ``k``/``v`` into ``k_cache``/``v_cache`` takes: one where both sides
    are joined along the heads (:func:`heads_joined`), else the keys and the values apart."""
    rows = heads_joined(k, v)  # first: rows projected apart fail its cheapest checks
    if rows is not None and rows.dtype == k_cache.dtype:
        cache = heads_joined(k_cache, v_cache)
        if cache is not None:
            return [(cache, rows)]
    return [(k_cache, k), (v_cache, v)]


def write_rows(cache: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
    """``cache[:, index] = rows`` for an int64 ``index`` of positions along dim 1 (one per row of ``rows``)."""
    if torch.compiler.is_compiling():
        cache[:, index] = rows  # index_put_
    else:
        cache.index_copy_(1, index, rows)  # the cheapest call eagerly (no indexing machinery on the host)
