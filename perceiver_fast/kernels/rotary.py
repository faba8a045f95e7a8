"""Rotary position embedding on interleaved channel pairs, as perceiver-io applies it.

Kept with the kernels because two layers need the same arithmetic: the models (through
:class:`perceiver_fast.models.core.position.RotaryPositionEmbedding`) and the decoding op, whose fused CUDA kernel
rotates the new query and key itself and must round exactly like this code.
"""

from __future__ import annotations

import torch


def rotate_interleaved(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``R = cos.shape[-1]`` channels of ``t`` ``[..., D]`` by angles given as ``cos``/``sin``.

    Channel pairs ``(2i, 2i + 1)`` rotate together: ``[x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]`` (each channel
    with its own entry of ``cos``/``sin``; perceiver-io repeats every angle for its pair). ``cos``/``sin`` broadcast
    against ``t[..., :R]``; they are float32 (float64 in a float64 model), so the products are float32 (float64)
    and the result is rounded back to ``t``'s dtype once. Channels from ``R`` on pass through.
    """
    rotate_dim = cos.shape[-1]
    t_rot, t_pass = t[..., :rotate_dim], t[..., rotate_dim:]
    pairs = t_rot.unflatten(-1, (-1, 2))
    partner = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return torch.cat(((t_rot * cos + partner * sin).to(t.dtype), t_pass), dim=-1)
