"""Packed query/key/value projections: one GEMM per layer in decoding steps, always the parameters' current values."""

from __future__ import annotations

import pytest
import torch

from perceiver_fast.models.core.attention import MultiHeadAttention
from perceiver_fast.models.core.packed import PackedProjections
from perceiver_fast.models.core.position import FrequencyPositionEncoding, RotaryPositionEmbedding


def _layers(count: int = 2, qkv_bias: bool = True, channels: int = 16) -> list[MultiHeadAttention]:
    shape = dict(num_heads=2, num_q_input_channels=channels, num_kv_input_channels=channels)
    layers = [MultiHeadAttention(**shape, qkv_bias=qkv_bias) for _ in range(count)]
    for layer in layers:
        layer.setup_cache(2, 8, dtype=torch.float32, device="cpu")
    return layers


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_each_layer_gets_its_own_rows_of_the_parameters(qkv_bias):
    torch.manual_seed(0)
    layers = _layers(3, qkv_bias)
    pack = PackedProjections(layers)
    pack.attach()
    for layer, packed in zip(layers, pack.packed):
        assert layer.kv_cache.packed is packed
        rows = torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight])
        assert torch.equal(packed.weight, rows)
        if qkv_bias:
            assert torch.equal(packed.bias, torch.cat([layer.q_proj.bias, layer.k_proj.bias, layer.v_proj.bias]))
        else:
            assert packed.bias is None
        weight, _ = packed.keys_values()
        assert torch.equal(weight, rows[layer.num_qk_channels :])
    assert len(pack.buffers()) == (2 if qkv_bias else 1)


def test_a_refresh_copies_parameters_changed_in_any_way_since():
    """In place (version counted), through ``.data`` (not counted) and replaced by a new tensor of the same shape."""
    torch.manual_seed(0)
    layers = _layers(2)
    pack = PackedProjections(layers)
    buffers = pack.buffers()
    with torch.no_grad():
        layers[0].q_proj.weight.mul_(2)
    layers[1].v_proj.weight.data.add_(1)
    layers[1].k_proj.bias = torch.nn.Parameter(torch.randn(16))
    pack.refresh()
    for layer, packed in zip(layers, pack.packed):
        assert torch.equal(packed.weight, torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight]))
        assert torch.equal(packed.bias, torch.cat([layer.q_proj.bias, layer.k_proj.bias, layer.v_proj.bias]))
    assert all(a is b for a, b in zip(pack.buffers(), buffers)), "a refresh must write into the same buffers"
    layers[0].q_proj = torch.nn.Linear(16, 8)
    with pytest.raises(RuntimeError, match="changed its shape"):
        pack.refresh()


@pytest.mark.parametrize(
    "make",
    [
        lambda: [*_layers(1, qkv_bias=True), *_layers(1, qkv_bias=False)],  # biases in some layers only
        lambda: [*_layers(1, channels=16), *_layers(1, channels=32)],  # input widths differ
    ],
    ids=["mixed-bias", "mixed-width"],
)
def test_layers_that_cannot_share_a_buffer_keep_their_own_projections(make):
    layers = make()
    pack = PackedProjections(layers)
    pack.attach()
    pack.refresh()
    assert pack.packed == [] and pack.buffers() == []
    assert all(layer.kv_cache.packed is None for layer in layers)


@pytest.mark.parametrize("rotary", [False, True])
def test_packed_rows_project_like_the_layers_own_modules(rotary):
    """Written keys/values and returned queries of a decoding layer, with and without the pack."""
    torch.manual_seed(0)
    layer = _layers(1)[0]
    x = torch.randn(2, 5, 16)
    rot = RotaryPositionEmbedding(FrequencyPositionEncoding(8)(torch.arange(5).expand(2, 5))) if rotary else None
    with torch.no_grad():
        q_own = layer.write_rows(x, 0, rot)
        k_own, v_own = layer.kv_cache.k[:, :5].clone(), layer.kv_cache.v[:, :5].clone()
        PackedProjections([layer]).attach()
        q_packed = layer.write_rows(x, 0, rot)
        k_packed, v_packed = layer.kv_cache.k[:, :5].clone(), layer.kv_cache.v[:, :5].clone()
        layer.kv_cache.k.zero_()
        layer.write_cache(x, 0, rot)  # keys/values alone, from the rows [W_k; W_v]
    for got, want in ((q_packed, q_own), (k_packed, k_own), (v_packed, v_own), (layer.kv_cache.k[:, :5], k_own)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_rows_in_another_dtype_are_cast_copies_refreshed_with_the_parameters(qkv_bias):
    """Steps under bf16 autocast read bf16 rows: one cast of the pack per refresh, none per layer."""
    torch.manual_seed(0)
    layers = _layers(2, qkv_bias)
    pack = PackedProjections(layers, dtype=torch.bfloat16)
    with torch.no_grad():
        layers[1].v_proj.weight.mul_(3)
    pack.refresh()
    assert len(pack.buffers()) == (4 if qkv_bias else 2)
    for layer, packed in zip(layers, pack.packed):
        rows = torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight])
        assert packed.weight.dtype == torch.bfloat16 and torch.equal(packed.weight, rows.bfloat16())
        if qkv_bias:
            bias = torch.cat([layer.q_proj.bias, layer.k_proj.bias, layer.v_proj.bias])
            assert torch.equal(packed.bias, bias.bfloat16())
    # The parameters' own dtype asks for no copies.
    assert len(PackedProjections(layers, dtype=torch.float32).buffers()) == (2 if qkv_bias else 1)
