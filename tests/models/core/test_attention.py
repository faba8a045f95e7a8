"""The decoding methods of the attention layers against their forward (the layer-level contract; generation's tests
check whole decoding steps against full forwards)."""

from __future__ import annotations

import pytest
import torch

from perceiver_fast.models.core.attention import SelfAttentionLayer
from perceiver_fast.models.core.position import FrequencyPositionEncoding, RotaryPositionEmbedding
from perceiver_fast.models.text.clm import CausalLanguageModel, CausalLanguageModelConfig


def _layer(bias: bool) -> SelfAttentionLayer:
    layer = SelfAttentionLayer(
        num_heads=2, num_channels=16, causal_attention=True, widening_factor=2, qkv_bias=bias, out_bias=bias,
        mlp_bias=bias,
    )  # fmt: skip
    for parameter in layer.parameters():  # perceiver-io zeroes biases; random ones test that they are added
        torch.nn.init.normal_(parameter, std=0.3)
    return layer.eval()


@pytest.mark.parametrize("keep_keys", [True, False])
@pytest.mark.parametrize("bias", [True, False], ids=["biases", "no-biases"])
def test_rows_decoded_at_once_equal_the_layers_forward(bias, keep_keys):
    """Without a bias the MLP's last GEMM accumulates into the residual (rounded once): within rounding of forward,
    which adds them apart. ``keep_keys=False`` attends to the rows' own keys and leaves the cache as it was."""
    torch.manual_seed(0)
    layer = _layer(bias)
    x = torch.randn(2, 6, 16)
    rot = RotaryPositionEmbedding(FrequencyPositionEncoding(8)(torch.arange(6).expand(2, 6)))
    with torch.no_grad():
        expected = layer(x, rot_pos_emb=rot)
        layer.attention_module.attention.setup_cache(2, 8, dtype=torch.float32, device="cpu")
        cache = layer.attention_module.attention.kv_cache
        cache.k.fill_(7.0)
        got = layer.forward_cached(x, 0, rot_pos_emb=rot, limit=6, keep_keys=keep_keys)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert bool((cache.k[:, :6] == 7.0).all()) != keep_keys


def test_rows_that_are_not_the_whole_context_must_keep_their_keys():
    layer = _layer(False)
    layer.attention_module.attention.setup_cache(1, 8, dtype=torch.float32, device="cpu")
    with torch.no_grad(), pytest.raises(ValueError, match="whole context"):
        layer.forward_cached(torch.randn(1, 3, 16), 2, limit=5, keep_keys=False)


def test_decoding_under_autocast_keeps_the_residual_stream_in_the_parameters_dtype():
    """Under bf16 autocast the MLP's output is bf16 and the residual stream float32: it stays float32."""
    torch.manual_seed(0)
    layer = _layer(False)
    x = torch.randn(2, 6, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = layer(x)
        layer.attention_module.attention.setup_cache(2, 8, dtype=torch.bfloat16, device="cpu")
        got = layer.forward_cached(x, 0, limit=6, keep_keys=False)
    assert got.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("autocast", [False, True])
def test_decoding_logits_equal_the_heads(autocast):
    """The head's decoding form adds the bias in its GEMM: within rounding of forward's, in forward's dtype."""
    torch.manual_seed(0)
    config = CausalLanguageModelConfig(num_channels=16, num_heads=2, max_latents=4, max_seq_len=8,
                                       num_self_attention_layers=1)  # fmt: skip
    model = CausalLanguageModel(config).eval()
    torch.nn.init.normal_(model.output_adapter.bias)
    h = torch.randn(2, 3, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        _, expected = model.head(h)
        _, got = model.head(h, decoding=True)
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_rows_decoded_with_gradients_backpropagate_like_forward():
    """Under autograd the MLP adds its residual apart (accumulating in place would overwrite what autograd saved)."""
    torch.manual_seed(0)
    layer = _layer(False)
    x = torch.randn(2, 6, 16, requires_grad=True)
    layer(x).sum().backward()
    expected = x.grad.clone()
    x.grad = None
    layer.attention_module.attention.setup_cache(2, 8, dtype=torch.float32, device="cpu")
    layer.forward_cached(x, 0, limit=6, keep_keys=False).sum().backward()
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-6)
