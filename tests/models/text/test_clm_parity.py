"""perceiver-io 0.11.0's CausalLanguageModel vs ours on the same weights (loaded strict): equal logits."""

import pytest
import torch

from perceiver_fast.models.text.clm import CausalLanguageModel, CausalLanguageModelConfig
from tests.oracle import max_rel_error
from tests.parity import copy_into, import_perceiver_io

CONFIGS = {
    "abs-pos-one-rotary": dict(abs_pos_emb=True, num_self_attention_rotary_layers=1),
    "rotary-only-all-layers": dict(abs_pos_emb=False, num_self_attention_rotary_layers=-1, output_norm=True),
    "heads-in-chunks-no-bias": dict(max_heads_parallel=2, output_bias=False, num_heads=8),
}


def _pair(**overrides):
    clm = import_perceiver_io("model.text.clm")
    kwargs = dict(num_channels=64, num_heads=4, num_self_attention_layers=2, max_latents=8, max_seq_len=40)
    kwargs.update(overrides)
    theirs = clm.CausalLanguageModel(clm.CausalLanguageModelConfig(**kwargs))
    ours = CausalLanguageModel(CausalLanguageModelConfig(**kwargs))
    return copy_into(ours, theirs)


def _left_padded(batch, n, pads):
    x = torch.randint(0, 262, (batch, n))
    pad_mask = torch.arange(n).expand(batch, n) < torch.tensor(pads).unsqueeze(1)
    return x, pad_mask


@pytest.mark.parity
@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("prefix_len", [0, 9, 23, 31])
def test_eval_logits_equal(name, prefix_len):
    ours, theirs = _pair(**CONFIGS[name])
    x, _ = _left_padded(2, 32, [0, 0])
    with torch.no_grad():
        expected = theirs(x, prefix_len=prefix_len).logits
        got = ours(x, prefix_len=prefix_len).logits
    assert got.shape == (2, 32 - prefix_len, 262)
    assert max_rel_error(got, expected) <= 1e-5


@pytest.mark.parity
@pytest.mark.parametrize("prefix_len", [4, 20])
def test_left_padded_batch_logits_equal(prefix_len):
    """Pads reach into the latents in the last row: there perceiver-io's uniform-softmax rows matter."""
    ours, theirs = _pair()
    x, pad_mask = _left_padded(3, 30, [0, 3, 26])
    with torch.no_grad():
        expected = theirs(x, prefix_len=prefix_len, pad_mask=pad_mask).logits
        got = ours(x, prefix_len=prefix_len, pad_mask=pad_mask).logits
    assert max_rel_error(got, expected) <= 1e-5


@pytest.mark.parity
def test_a_dropout_of_one_trains_as_perceiver_ios():
    """nn.Dropout(1.0) drops every attention probability (and every residual): perceiver-io's layers then give
    their output biases, where the op refuses dropout_p = 1."""
    ours, theirs = _pair(post_attention_dropout=1.0, cross_attention_dropout=0.0)
    ours.train()
    theirs.train()
    x, pad_mask = _left_padded(2, 30, [0, 4])
    expected = theirs(x, prefix_len=20, pad_mask=pad_mask).logits
    got = ours(x, prefix_len=20, pad_mask=pad_mask).logits
    assert max_rel_error(got, expected) <= 1e-5
    got.sum().backward()
    expected.sum().backward()
    theirs_grads = dict(theirs.named_parameters())
    for name, parameter in ours.named_parameters():  # zeros where theirs are zeros (an optimizer's weight decay acts)
        torch.testing.assert_close(parameter.grad, theirs_grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parity
def test_train_mode_prefix_dropout_draws_the_same_positions():
    ours, theirs = _pair(cross_attention_dropout=0.5)
    ours.train()
    theirs.train()
    x, pad_mask = _left_padded(3, 36, [0, 5, 12])
    torch.manual_seed(123)
    expected = theirs(x, prefix_len=28, pad_mask=pad_mask).logits
    torch.manual_seed(123)
    got = ours(x, prefix_len=28, pad_mask=pad_mask).logits
    assert max_rel_error(got, expected) <= 1e-5
    got.sum().backward()  # dropout path is differentiable end to end
    assert ours.input_adapter.txt_embedding.weight.grad is not None


@pytest.mark.parity
def test_state_dict_keys_and_config_defaults_match():
    clm = import_perceiver_io("model.text.clm")
    assert vars(clm.CausalLanguageModelConfig()) == vars(CausalLanguageModelConfig())
    small = dict(num_channels=32, num_heads=2, num_self_attention_layers=1, max_latents=4, max_seq_len=16)
    theirs = clm.CausalLanguageModel(clm.CausalLanguageModelConfig(**small))
    ours = CausalLanguageModel(CausalLanguageModelConfig(**small))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
