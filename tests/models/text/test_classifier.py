"""perceiver-io 0.11.0's TextClassifier vs ours on the same weights (loaded strict): equal logits."""

import pytest
import torch

from perceiver_fast.models.text.classifier import (
    ClassificationDecoderConfig,
    TextClassifier,
    TextClassifierConfig,
    TextEncoderConfig,
)
from tests.models.core.io_parity import assert_round_trip, import_perceiver_io_backend, perturb_parameters
from tests.oracle import max_rel_error
from tests.parity import copy_into

VOCAB, SEQ = 60, 16
ENCODER = dict(
    vocab_size=VOCAB,
    max_seq_len=SEQ,
    num_input_channels=32,
    num_cross_attention_heads=2,
    num_self_attention_heads=4,
    num_self_attention_layers_per_block=2,
    num_self_attention_blocks=2,
)
DECODER = dict(num_output_query_channels=24, num_classes=7, num_cross_attention_heads=2)


def _config(module):
    return module.TextClassifierConfig(
        module.TextEncoderConfig(**ENCODER),
        module.ClassificationDecoderConfig(**DECODER),
        num_latents=8,
        num_latent_channels=40,
    )


def _ours_config():
    return TextClassifierConfig(
        TextEncoderConfig(**ENCODER), ClassificationDecoderConfig(**DECODER), num_latents=8, num_latent_channels=40
    )


@pytest.mark.parity
def test_logits_equal_with_padding():
    classifier = import_perceiver_io_backend("model.text.classifier")
    theirs = perturb_parameters(classifier.TextClassifier(_config(classifier)))
    ours, theirs = copy_into(TextClassifier(_ours_config()), theirs)
    x = torch.randint(0, VOCAB, (3, SEQ))
    pad_mask = torch.arange(SEQ).expand(3, SEQ) >= torch.tensor([[SEQ], [6], [0]])
    with torch.no_grad():
        for mask in (None, pad_mask):
            expected, got = theirs(x, pad_mask=mask), ours(x, pad_mask=mask)
            assert got.shape == (3, 7)
            assert max_rel_error(got, expected) <= 1e-5


@pytest.mark.parity
def test_a_seeded_model_starts_from_perceiver_ios_weights():
    """Built after the same seed, every weight equals perceiver-io's: a seeded run from scratch starts where theirs
    does (the output queries used to be drawn after the output layer, and so from other numbers)."""
    classifier = import_perceiver_io_backend("model.text.classifier")
    torch.manual_seed(0)
    theirs = classifier.TextClassifier(_config(classifier)).state_dict()
    torch.manual_seed(0)
    ours = TextClassifier(_ours_config()).state_dict()
    assert sorted(ours) == sorted(theirs)
    assert [name for name in ours if not torch.equal(ours[name], theirs[name])] == []


def test_save_and_load_round_trip(tmp_path):
    x = torch.randint(0, VOCAB, (2, SEQ))
    assert_round_trip(TextClassifier(_ours_config()), (x,), tmp_path / "classifier")


def test_loading_another_model_class_raises(tmp_path):
    from perceiver_fast.models.text.mlm import MaskedLanguageModel

    TextClassifier(_ours_config()).save_pretrained(tmp_path / "classifier")
    with pytest.raises(ValueError, match="TextClassifier, not a MaskedLanguageModel"):
        MaskedLanguageModel.from_pretrained(tmp_path / "classifier")
