import math

import torch

from perceiver_fast.models.core.position import (
    FourierPositionEncoding,
    FrequencyPositionEncoding,
    RotaryPositionEmbedding,
    positions,
)


def test_positions_shift_left_padding_to_zero():
    pos = positions(2, 5, shift=torch.tensor([[0], [2]]))
    assert pos.tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]]


def test_rotary_is_relative_and_rotates_interleaved_pairs():
    enc = FrequencyPositionEncoding(dim=8)
    angles = enc(torch.arange(10).unsqueeze(0))
    assert torch.equal(angles[..., 0::2], angles[..., 1::2])  # each frequency serves one pair
    rot = RotaryPositionEmbedding(angles)
    q, k = torch.randn(1, 1, 1, 12), torch.randn(1, 1, 1, 12)
    # <R(p) q, R(p + d) k> depends only on d; channels past the rotated 8 pass through unchanged.
    qs = rot.rotate(q.expand(1, 10, 1, 12).contiguous())
    ks = rot.rotate(k.expand(1, 10, 1, 12).contiguous())
    dots = [float((qs[0, p, 0, :8] * ks[0, p + 3, 0, :8]).sum()) for p in range(7)]
    assert max(dots) - min(dots) < 1e-5
    assert torch.equal(qs[..., 8:], q.expand(1, 10, 1, 12)[..., 8:])
    # the partner of pair (x1, x2) is (-x2, x1): a quarter turn at angle pi/2
    quarter = RotaryPositionEmbedding(torch.full((1, 1, 2), math.pi / 2))
    turned = quarter.rotate(torch.tensor([[[[1.0, 2.0]]]]))
    torch.testing.assert_close(turned, torch.tensor([[[[-2.0, 1.0]]]]), atol=1e-6, rtol=0)


def test_rotary_right_alignment_takes_the_last_positions():
    angles = torch.randn(2, 6, 4)
    t = torch.randn(2, 2, 3, 4)
    right = RotaryPositionEmbedding(angles, right_align=True).rotate(t)
    assert torch.equal(right, RotaryPositionEmbedding(angles[:, -2:]).rotate(t))


def test_fourier_encoding_layout():
    enc = FourierPositionEncoding((3, 4), num_frequency_bands=2)
    assert enc.num_position_encoding_channels() == 2 * (2 * 2 + 1)
    grid = enc.position_encoding.view(3, 4, -1)
    assert torch.equal(grid[:, 0, 0], torch.linspace(-1, 1, 3))  # 'ij' order: first axis varies down rows
    assert torch.equal(grid[0, :, 1], torch.linspace(-1, 1, 4))
    torch.testing.assert_close(grid[..., 2], torch.sin(math.pi * grid[..., 0]))  # lowest band has frequency 1
    assert enc(5).shape == (5, 12, 10)
