"""Turning boolean padding masks into the attention op's per-row key bounds."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensor

from perceiver_fast.kernels.problem import host_readable


def require(condition: torch.Tensor, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition`` (a 0-d bool tensor) holds.

    Free to read on CPU; on a GPU a read is a device sync in every forward, so the condition is asserted on the device
    instead: a violation stops the CUDA context with the message (as an out-of-range embedding index does) rather
    than letting a wrong mask through. Tracing (``torch.compile``, fake or meta tensors) checks nothing.
    """
    if host_readable(condition):
        if not bool(condition):
            raise ValueError(message)
    elif condition.device.type == "cuda" and not (torch.compiler.is_compiling() or isinstance(condition, FakeTensor)):
        torch._assert_async(condition, message)


def padding_bounds(pad_mask: torch.Tensor, *, left_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kv_start, kv_len)`` int32 for a ``[B, L]`` padding mask (True = pad) whose real tokens are contiguous.

    Left padding sets ``kv_start``, right padding ``kv_len``; both may occur unless ``left_only`` (causal attention
    aligns queries with the end of the key sequence, so trailing pads would move that alignment). A row that is all
    padding gives ``kv_start == kv_len``. Any other mask (a pad between real tokens) raises ``ValueError``: the
    attention op has no dense mask argument.
    """
    if pad_mask.dtype != torch.bool or pad_mask.dim() != 2:
        raise ValueError(f"pad_mask must be a [batch, seq] bool tensor, got {pad_mask.dtype} {tuple(pad_mask.shape)}")
    length = pad_mask.shape[1]
    is_pad = pad_mask.to(torch.int32)
    leading = is_pad.cumprod(dim=1).sum(dim=1)
    trailing = is_pad.flip(1).cumprod(dim=1).sum(dim=1)
    if left_only:
        kv_len = torch.full_like(leading, length)
    else:
        kv_len = (length - trailing).clamp(min=0)
    kv_start = leading.minimum(kv_len)
    real = length - is_pad.sum(dim=1)
    where = "at the start" if left_only else "at the start and/or end"
    require((kv_len - kv_start == real).all(), f"pad_mask must mark padding only {where} of each row")
    return kv_start.to(torch.int32), kv_len.to(torch.int32)


def rows_without_keys(
    num_queries: int, num_keys: int, kv_start: torch.Tensor, kv_len: torch.Tensor, *, causal: bool
) -> torch.Tensor:
    """``[B, Nq]`` bool: the query rows that see no key under the op's masking rules (bottom-right causal)."""
    if not causal:
        return (kv_start >= kv_len).unsqueeze(1).expand(-1, num_queries)
    position = kv_len.unsqueeze(1) - num_queries + torch.arange(num_queries, device=kv_len.device)
    end = torch.minimum(kv_len.unsqueeze(1), position + 1)
    return kv_start.unsqueeze(1) >= end
