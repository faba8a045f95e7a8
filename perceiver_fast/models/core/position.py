"""Position encodings: absolute positions with left-padding shift, rotary (interleaved pairs), Fourier features."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from perceiver_fast.kernels.rotary import rotate_pairs, rotation_matrices


def positions(b: int, n: int, shift: torch.Tensor | None = None, device: torch.device | None = None) -> torch.Tensor:
    """``[b, n]`` absolute positions ``0..n-1``, moved left by ``shift`` ``[b, 1]`` (the pad count) and clamped at 0.

    With left padding every pad shares position 0 with the first real token, as in perceiver-io.
    """
    pos = torch.arange(n, device=device).expand(b, n)
    if shift is not None:
        if shift.shape != (b, 1):
            raise ValueError(f"shift must have shape {(b, 1)}, got {tuple(shift.shape)}")
        pos = pos - shift
    return pos.clamp(min=0)


class FrequencyPositionEncoding(nn.Module):
    """Rotary angles: ``position * inv_freq`` with ``inv_freq = 10000 ** (-2i / dim)``, each repeated for a pair."""

    def __init__(self, dim: int):
        super().__init__()
        # A persistent buffer: perceiver-io state dicts carry it (``...frq_pos_encoding.inv_freq``).
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))

    def forward(self, abs_pos: torch.Tensor) -> torch.Tensor:
        """``[b, n]`` positions -> ``[b, n, dim]`` angles, interleaved as ``f0 f0 f1 f1 ...``."""
        # One kernel (decoding runs this per token): integer positions promote to inv_freq's dtype inside the
        # product, as a cast would, and broadcasting against the pairs writes each angle twice.
        if abs_pos.is_floating_point():
            abs_pos = abs_pos.to(self.inv_freq.dtype)
        pairs = self.inv_freq.unsqueeze(-1).expand(-1, 2)
        return (abs_pos[..., None, None] * pairs).flatten(-2)


class RotaryPositionEmbedding:
    """Rotates the first ``dim`` channels of every head by angles ``frq_pos_enc`` ``[b, n, dim]``.

    Works on the attention layout ``[b, seq, heads, head_dim]``. With ``right_align`` a shorter sequence takes the
    last positions (queries and keys are right-aligned in Perceiver AR), otherwise the first. Pairs of channels are
    interleaved: ``[x1, x2, x3, x4] -> [-x2, x1, -x4, x3]`` is the rotated partner.
    """

    def __init__(self, frq_pos_enc: torch.Tensor, right_align: bool = False):
        self._angles = frq_pos_enc.unsqueeze(2)  # broadcast over heads
        self.rotate_dim = frq_pos_enc.shape[-1]
        self.right_align = right_align
        self._matrices: torch.Tensor | None = None  # made on the first rotation, shared by the later ones

    @classmethod
    def from_matrices(cls, matrices: torch.Tensor, right_align: bool = False) -> RotaryPositionEmbedding:
        """The embedding whose :attr:`matrices` are ``matrices`` (kept from an earlier embedding of the same
        positions: decoding keeps them per latent rather than making them again each step)."""
        rot = cls.__new__(cls)
        rot._angles, rot._matrices = None, matrices
        rot.rotate_dim, rot.right_align = matrices.shape[-3] * 2, right_align
        return rot

    @property
    def matrices(self) -> torch.Tensor:
        """``[b, n, 1, dim / 2, 2, 2]``: each channel pair's rotation (see :func:`rotation_matrices`)."""
        if self._matrices is None:
            self._matrices = rotation_matrices(self._angles.cos(), self._angles.sin())
        return self._matrices

    def _window(self, seq_len: int) -> slice:
        return slice(-seq_len, None) if self.right_align else slice(0, seq_len)

    def angles(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` ``[b, seq_len, 1, dim]`` of a sequence of ``seq_len`` positions (aligned as configured), for
        ops that take the angles rather than a rotation (:func:`~perceiver_fast.kernels.decode_attention`)."""
        if self._angles is None:
            raise ValueError("this embedding was made from rotation matrices: it keeps no angles")
        angles = self._angles[:, self._window(seq_len)]
        return angles.cos(), angles.sin()

    def rotate(self, t: torch.Tensor) -> torch.Tensor:
        # The angles are float32; under bf16 autocast the rotated part keeps the input dtype (q/k/v share one).
        return rotate_pairs(t, self.matrices[:, self._window(t.shape[1])])


class FourierPositionEncoding(nn.Module):
    """Fourier features of a fixed grid (Perceiver IO images): coordinates in [-1, 1] per axis, then for each axis
    ``num_frequency_bands`` frequencies from 1 to size/2, ``sin`` and ``cos`` of ``pi * f * x``; coordinates first.
    """

    def __init__(self, input_shape: tuple[int, ...], num_frequency_bands: int):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.num_frequency_bands = num_frequency_bands
        coords = [torch.linspace(-1.0, 1.0, steps=s) for s in self.input_shape]
        grid = torch.stack(torch.meshgrid(*coords, indexing="ij"), dim=-1)  # [*shape, ndim]
        encoding = self._encode(grid)
        self.register_buffer("position_encoding", encoding.reshape(-1, encoding.shape[-1]))

    def _encode(self, grid: torch.Tensor) -> torch.Tensor:
        scaled = [
            grid[..., i : i + 1] * torch.linspace(1.0, size / 2.0, self.num_frequency_bands)
            for i, size in enumerate(self.input_shape)
        ]
        return torch.cat(
            [grid] + [torch.sin(math.pi * s) for s in scaled] + [torch.cos(math.pi * s) for s in scaled], dim=-1
        )

    def num_position_encoding_channels(self, include_positions: bool = True) -> int:
        return len(self.input_shape) * (2 * self.num_frequency_bands + include_positions)

    def forward(self, b: int) -> torch.Tensor:
        return self.position_encoding.unsqueeze(0).expand(b, -1, -1)
