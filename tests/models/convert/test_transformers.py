"""transformers' Perceiver models (small, random init, no downloads) converted to ours: equal logits."""

import pytest
import torch

from perceiver_fast.models.convert.transformers import (
    masked_lm_config_from_transformers,
    text_classifier_from_transformers,
)
from perceiver_fast.models.text.classifier import TextClassifier
from perceiver_fast.models.text.mlm import MaskedLanguageModel
from perceiver_fast.models.vision.image_classifier import ImageClassifier
from perceiver_fast.models.vision.optical_flow import OpticalFlow
from tests.models.core.io_parity import perturb_parameters
from tests.oracle import max_rel_error

transformers = pytest.importorskip("transformers")

VOCAB, MAX_POS = 50, 24
SMALL = dict(
    num_latents=8,
    d_latents=48,
    d_model=32,
    num_blocks=2,
    num_self_attends_per_block=2,
    num_self_attention_heads=4,
    num_cross_attention_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=MAX_POS,
    num_labels=3,
)
VARIANTS = {
    "defaults": dict(),
    "explicit-widths-q-shape": dict(
        qk_channels=16,
        v_channels=48,
        cross_attention_shape_for_attention="q",
        cross_attention_widening_factor=2,
        self_attention_widening_factor=3,
    ),
}


def _hf(cls_name, **overrides):
    config = transformers.PerceiverConfig(**{**SMALL, **overrides})
    return perturb_parameters(getattr(transformers, cls_name)(config).eval())


def _text_batch():
    x = torch.randint(0, VOCAB, (3, 20))
    attention_mask = (torch.arange(20).expand(3, 20) < torch.tensor([[20], [9], [0]])).long()  # last row: no tokens
    return x, attention_mask


@pytest.mark.parametrize("name", VARIANTS)
def test_masked_lm_logits_equal(name):
    theirs = _hf("PerceiverForMaskedLM", **VARIANTS[name])
    ours = MaskedLanguageModel.from_transformers(theirs)
    x, attention_mask = _text_batch()
    with torch.no_grad():
        for mask in (None, attention_mask):
            expected = theirs(inputs=x, attention_mask=mask).logits[:, : x.shape[1]]
            got = ours(x, pad_mask=None if mask is None else ~mask.bool())
            assert max_rel_error(got, expected) <= 1e-5


def test_a_bf16_model_converts_to_a_bf16_model():
    """The converted model keeps the source's dtype (float32 would be another model, at twice the memory)."""
    theirs = _hf("PerceiverForMaskedLM").to(torch.bfloat16)
    ours = MaskedLanguageModel.from_transformers(theirs)
    assert {t.dtype for t in [*ours.parameters(), *ours.buffers()] if t.is_floating_point()} == {torch.bfloat16}
    x, attention_mask = _text_batch()
    with torch.no_grad():
        expected = theirs(inputs=x, attention_mask=attention_mask).logits[:, : x.shape[1]].float()
        got = ours(x, pad_mask=~attention_mask.bool()).float()
        reference = MaskedLanguageModel.from_transformers(theirs.float())(x, pad_mask=~attention_mask.bool())
    # bf16 rounding on both sides (2^-8 relative per op), against the float32 conversion's logits
    assert max_rel_error(got, reference) <= 0.05 and max_rel_error(expected, reference) <= 0.05


def test_masked_lm_decoder_follows_transformers_fixed_sizes():
    config = masked_lm_config_from_transformers(_hf("PerceiverForMaskedLM"))
    assert config.decoder.num_cross_attention_heads == 8 and config.decoder.num_cross_attention_qk_channels == 256
    assert not config.decoder.cross_attention_residual and config.decoder.num_output_query_channels is None
    assert (config.num_latents, config.num_latent_channels, config.encoder.num_self_attention_blocks) == (8, 48, 2)


@pytest.mark.parametrize("name", VARIANTS)
def test_sequence_classifier_logits_equal(name):
    theirs = _hf("PerceiverForSequenceClassification", **VARIANTS[name])
    ours = TextClassifier.from_transformers(theirs)
    x, attention_mask = _text_batch()
    with torch.no_grad():
        expected = theirs(inputs=x, attention_mask=attention_mask).logits
        got = ours(x, pad_mask=~attention_mask.bool())
    assert got.shape == (3, 3)
    assert max_rel_error(got, expected) <= 1e-5


def test_image_classifier_fourier_logits_equal():
    """transformers fixes the Fourier frequencies for 224 x 224 images, so the test runs at that size."""
    theirs = _hf("PerceiverForImageClassificationFourier", d_latents=32, num_blocks=1, num_self_attends_per_block=1,
                 num_self_attention_heads=2, num_cross_attention_heads=1, num_labels=5)
    ours = ImageClassifier.from_transformers(theirs)
    assert ours.config.encoder.image_shape == (224, 224, 3)
    pixel_values = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = theirs(inputs=pixel_values).logits
        got = ours(pixel_values.permute(0, 2, 3, 1))
    assert max_rel_error(got, expected) <= 1e-5


def test_optical_flow_equal():
    theirs = _hf("PerceiverForOpticalFlow", d_latents=32, num_blocks=1, num_self_attends_per_block=2,
                 num_self_attention_heads=2, num_cross_attention_heads=1, train_size=[6, 8])
    ours = OpticalFlow.from_transformers(theirs)
    frames = torch.randn(2, 2, 27, 6, 8)
    with torch.no_grad():
        expected = theirs(inputs=frames).logits
        got = ours(frames)
    assert got.shape == expected.shape == (2, 6, 8, 2)
    assert max_rel_error(got, expected) <= 1e-5


def test_converted_model_saves_and_loads(tmp_path):
    ours = MaskedLanguageModel.from_transformers(_hf("PerceiverForMaskedLM"))
    ours.save_pretrained(tmp_path / "mlm")
    loaded = MaskedLanguageModel.from_pretrained(tmp_path / "mlm")
    x, attention_mask = _text_batch()
    with torch.no_grad():
        assert torch.equal(loaded(x, ~attention_mask.bool()), ours(x, ~attention_mask.bool()))


@pytest.mark.parametrize(
    "cls_name, overrides, match",
    [
        ("PerceiverForMaskedLM", dict(), "expected a PerceiverForSequenceClassification"),
        ("PerceiverForSequenceClassification", dict(hidden_act="relu"), "hidden_act must be 'gelu'"),
        ("PerceiverForSequenceClassification", dict(use_query_residual=False), "no query residual"),
    ],
)
def test_unsupported_models_raise(cls_name, overrides, match):
    with pytest.raises(ValueError, match=match):
        text_classifier_from_transformers(_hf(cls_name, **overrides))


def test_learned_position_image_model_is_refused():
    """``PerceiverForImageClassificationLearned`` has no perceiver-io counterpart (conv1x1 + learned positions)."""
    with pytest.raises(ValueError, match="expected a PerceiverForImageClassificationFourier"):
        ImageClassifier.from_transformers(_hf("PerceiverForImageClassificationLearned", image_size=8, d_latents=32))
