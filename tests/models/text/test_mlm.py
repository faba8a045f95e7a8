"""perceiver-io 0.11.0's MaskedLanguageModel vs ours on the same weights (loaded strict): equal logits."""

import pytest
import torch

from perceiver_fast.models.text import mlm as ours_mlm
from perceiver_fast.models.text.mlm import MaskedLanguageModel, TextDecoderConfig, TextEncoderConfig
from tests.models.core.io_parity import assert_round_trip, import_perceiver_io_backend, perturb_parameters
from tests.oracle import max_rel_error
from tests.parity import copy_into, import_perceiver_io

VOCAB, SEQ = 60, 20
ENCODER = dict(
    vocab_size=VOCAB,
    max_seq_len=SEQ,
    num_input_channels=32,
    num_cross_attention_heads=2,
    num_self_attention_heads=4,
    num_self_attention_layers_per_block=2,
)
DECODER = dict(vocab_size=VOCAB, max_seq_len=SEQ + 4, num_cross_attention_heads=2)
VARIANTS = {
    "tied-output": (dict(), dict()),
    "own-output-no-residual": (dict(), dict(num_output_query_channels=16, cross_attention_residual=False)),
    "two-blocks-qk-v-widths": (
        dict(num_self_attention_blocks=2, num_cross_attention_layers=2, num_cross_attention_qk_channels=16,
             num_cross_attention_v_channels=24, num_self_attention_qk_channels=16),
        dict(num_cross_attention_qk_channels=8, num_cross_attention_v_channels=16),
    ),
}


def _config(module, encoder=None, decoder=None):
    return module.MaskedLanguageModelConfig(
        module.TextEncoderConfig(**{**ENCODER, **(encoder or {})}),
        module.TextDecoderConfig(**{**DECODER, **(decoder or {})}),
        num_latents=8,
        num_latent_channels=40,
    )


def _pair(encoder=None, decoder=None):
    mlm = import_perceiver_io_backend("model.text.mlm")
    theirs = perturb_parameters(mlm.MaskedLanguageModel(_config(mlm, encoder, decoder)))
    ours = MaskedLanguageModel(_config(ours_mlm, encoder, decoder))
    return copy_into(ours, theirs)


def _padded(lengths, n=SEQ - 2):
    x = torch.randint(0, VOCAB, (len(lengths), n))
    right = torch.arange(n).expand(len(lengths), n) >= torch.tensor(lengths).unsqueeze(1)
    return x, right


@pytest.mark.parity
@pytest.mark.parametrize("name", VARIANTS)
def test_logits_equal_with_and_without_padding(name):
    ours, theirs = _pair(*VARIANTS[name])
    x, right = _padded([18, 11, 0])  # the last row is all padding: perceiver-io's uniform-softmax rule
    left = right.flip(1)
    with torch.no_grad():
        for mask in (None, right, left):
            expected, got = theirs(x, pad_mask=mask), ours(x, pad_mask=mask)
            assert got.shape == (3, SEQ - 2, VOCAB)
            assert max_rel_error(got, expected) <= 1e-5


@pytest.mark.parity
@pytest.mark.parametrize("name", ["tied-output", "own-output-no-residual"])
def test_single_token_input_keeps_the_sequence_axis(name):
    """Ours decodes only the first n queries; with n = 1 the untied adapter's squeeze must not drop the axis."""
    ours, theirs = _pair(*VARIANTS[name])
    x = torch.randint(0, VOCAB, (2, 1))
    with torch.no_grad():
        expected, got = theirs(x), ours(x)
    assert got.shape == expected.shape == (2, 1, VOCAB)
    assert max_rel_error(got, expected) <= 1e-5


@pytest.mark.parity
def test_state_dict_keys_and_config_defaults_match():
    mlm = import_perceiver_io_backend("model.text.mlm")
    assert vars(mlm.TextEncoderConfig()) == vars(TextEncoderConfig())
    assert vars(mlm.TextDecoderConfig()) == vars(TextDecoderConfig())
    _, theirs = _pair()
    ours = MaskedLanguageModel(_config(ours_mlm))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


@pytest.mark.parity
def test_training_step_gradients_match():
    ours, theirs = _pair(decoder=dict(num_output_query_channels=16))
    x, right = _padded([18, 9])
    labels = torch.randint(0, VOCAB, x.shape)
    for model in (ours, theirs):
        model.train()
        torch.nn.functional.cross_entropy(model(x, pad_mask=right).transpose(1, 2), labels).backward()
    theirs_grads = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        assert max_rel_error(param.grad, theirs_grads[name].grad) <= 1e-5, name


def test_save_and_load_round_trip(tmp_path):
    model = MaskedLanguageModel(_config(ours_mlm, *VARIANTS["two-blocks-qk-v-widths"]))
    x, right = _padded([18, 5])
    assert_round_trip(model, (x, right), tmp_path / "mlm")


@pytest.mark.parametrize(
    "x, error, match",
    [
        (torch.zeros(2, SEQ + 1, dtype=torch.long), ValueError, "max_seq_len"),
        (torch.zeros(2, 5), TypeError, "integer"),
        (torch.zeros(5, dtype=torch.long), ValueError, "batch, seq"),
    ],
)
def test_bad_input_raises(x, error, match):
    model = MaskedLanguageModel(_config(ours_mlm))
    with pytest.raises(error, match=match):
        model(x)


def test_longer_input_than_decoder_queries_raises():
    model = MaskedLanguageModel(_config(ours_mlm, decoder=dict(max_seq_len=SEQ - 5)))
    with pytest.raises(ValueError, match="decoder's max_seq_len"):
        model(torch.zeros(1, SEQ - 4, dtype=torch.long))


def test_text_common_holds_the_shared_text_encoder():
    """``perceiver.model.text.common`` (and its ``backend``) -> ``perceiver_fast.models.text.common``."""
    from perceiver_fast.models.text import common
    from perceiver_fast.models.text.common import backend

    for module in (common, backend):
        assert (module.TextEncoder, module.TextEncoderConfig) == (ours_mlm.TextEncoder, TextEncoderConfig)


@pytest.mark.parity
def test_text_common_has_every_name_perceiver_io_exports_there():
    from perceiver_fast.models.text import common

    theirs = import_perceiver_io("model.text.common")
    exported = {name for name, value in vars(theirs).items() if isinstance(value, type)}
    assert exported == {"TextEncoder", "TextEncoderConfig"} and exported <= set(common.__all__)
