"""Rotary position embedding on interleaved channel pairs, as perceiver-io applies it.

Kept with the kernels because two layers need the same arithmetic: the models (through
:class:`perceiver_fast.models.core.position.RotaryPositionEmbedding`) and the decoding op, whose fused CUDA kernel
rotates the new query and key itself and must round exactly like this code.

A rotation is written as one broadcast product and one sum of its two halves (each pair times its 2x2 matrix): two
kernels where the textbook form (negate, interleave, two products, a sum) takes five. Decoding replays these for
every token, where each kernel launch costs more than its arithmetic.
"""

from __future__ import annotations

import torch


def rotation_matrices(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``[..., R/2, 2, 2]`` matrices of the channel pairs of ``cos``/``sin`` ``[..., R]`` (for :func:`rotate_pairs`):
    pair ``i`` maps ``(x1, x2)`` to ``(x1 cos[2i] - x2 sin[2i], x1 sin[2i+1] + x2 cos[2i+1])``."""
    rows = (cos[..., 0::2], -sin[..., 0::2], sin[..., 1::2], cos[..., 1::2])
    return torch.stack(rows, dim=-1).unflatten(-1, (2, 2))


def rotate_pairs(t: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """:func:`rotate_interleaved` with the angles given as :func:`rotation_matrices` (shared by several rotations).

    Each output channel is the sum of two products rounded apiece (no fused multiply-add), as
    ``x1 cos - x2 sin`` computes it: ``x2 * -sin`` is ``-(x2 * sin)`` exactly.
    """
    rotate_dim = matrices.shape[-3] * 2
    t_rot, t_pass = t[..., :rotate_dim], t[..., rotate_dim:]
    products = t_rot.unflatten(-1, (-1, 1, 2)) * matrices
    rotated = (products[..., 0] + products[..., 1]).flatten(-2).to(t.dtype)
    return torch.cat((rotated, t_pass), dim=-1) if t_pass.shape[-1] else rotated


def rotate_interleaved(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``R = cos.shape[-1]`` channels of ``t`` ``[..., D]`` by angles given as ``cos``/``sin``.

    Channel pairs ``(2i, 2i + 1)`` rotate together: ``[x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]`` (each channel
    with its own entry of ``cos``/``sin``; perceiver-io repeats every angle for its pair). ``cos``/``sin`` broadcast
    against ``t[..., :R]``; they are float32 (float64 in a float64 model), so the products are float32 (float64)
    and the result is rounded back to ``t``'s dtype once. Channels from ``R`` on pass through.
    """
    return rotate_pairs(t, rotation_matrices(cos, sin))
