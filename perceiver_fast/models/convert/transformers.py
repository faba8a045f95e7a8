"""Hugging Face ``transformers`` Perceiver models -> our Perceiver IO models (config and weights).

Supported: ``PerceiverForMaskedLM`` -> :class:`MaskedLanguageModel`, ``PerceiverForSequenceClassification`` ->
:class:`TextClassifier`, ``PerceiverForImageClassificationFourier`` -> :class:`ImageClassifier` and
``PerceiverForOpticalFlow`` -> :class:`OpticalFlow`. Sizes (heads, q/k and v widths, MLP widening, query residuals)
are read from the instantiated ``transformers`` modules, not re-derived from ``PerceiverConfig``, so a converted model
has exactly the source's architecture; anything ours cannot express raises ``ValueError`` naming it.

A hub checkpoint is converted by loading it with ``transformers`` first::

    from transformers import PerceiverForMaskedLM
    from perceiver_fast.models.text.mlm import MaskedLanguageModel

    model = MaskedLanguageModel.from_transformers(PerceiverForMaskedLM.from_pretrained("deepmind/language-perceiver"))
    model.save_pretrained("language-perceiver-fast")

Inputs differ in layout only where the models do: ``transformers`` takes images channels first ``[b, c, h, w]``, our
image classifier channels last ``[b, h, w, c]``; ``attention_mask`` (1 = token) becomes ``pad_mask = ~mask.bool()``;
``PerceiverForMaskedLM`` returns logits for all ``max_position_embeddings`` output queries, ours for the ``n`` input
positions (the first ``n`` of theirs).
"""

from __future__ import annotations

import torch.nn as nn

from perceiver_fast.models.convert import transformers_reader
from perceiver_fast.models.core.config import PerceiverIOConfig
from perceiver_fast.models.text.classifier.backend import TextClassifier
from perceiver_fast.models.text.mlm.backend import MaskedLanguageModel
from perceiver_fast.models.vision.image_classifier.backend import ImageClassifier
from perceiver_fast.models.vision.optical_flow.backend import NUM_FRAMES, OpticalFlow

__all__ = [
    "image_classifier_config_from_transformers",
    "image_classifier_from_transformers",
    "masked_lm_config_from_transformers",
    "masked_lm_from_transformers",
    "optical_flow_config_from_transformers",
    "optical_flow_from_transformers",
    "text_classifier_config_from_transformers",
    "text_classifier_from_transformers",
]


def masked_lm_config_from_transformers(model: nn.Module) -> PerceiverIOConfig:
    """Our ``MaskedLanguageModelConfig`` for a ``transformers.PerceiverForMaskedLM``.

    Its decoder (8 heads, 256 qk channels, no query residual, in ``transformers``) is read from the module; the
    output is tied to the token embedding with a bias, as ours with ``num_output_query_channels=None``.
    """
    return transformers_reader.masked_lm_config(model, MaskedLanguageModel)


def masked_lm_from_transformers(model: nn.Module) -> MaskedLanguageModel:
    """Convert a ``transformers.PerceiverForMaskedLM`` into a :class:`MaskedLanguageModel` (eval mode)."""
    return MaskedLanguageModel.from_transformers(model)


def text_classifier_config_from_transformers(model: nn.Module) -> PerceiverIOConfig:
    """Our ``TextClassifierConfig`` for a ``transformers.PerceiverForSequenceClassification``."""
    return transformers_reader.text_classifier_config(model, TextClassifier)


def text_classifier_from_transformers(model: nn.Module) -> TextClassifier:
    """Convert a ``transformers.PerceiverForSequenceClassification`` into a :class:`TextClassifier` (eval mode)."""
    return TextClassifier.from_transformers(model)


def image_classifier_config_from_transformers(model: nn.Module) -> PerceiverIOConfig:
    """Our ``ImageClassifierConfig`` for a ``transformers.PerceiverForImageClassificationFourier``.

    ``transformers`` spaces the Fourier frequencies up to ``max_resolution / 2`` (224 / 2 in that model) whatever
    the image size; ours spaces them up to ``image_size / 2``. So the converted model takes images of exactly
    ``max_resolution`` (224 x 224), the size the checkpoints were trained at.
    """
    return transformers_reader.image_classifier_config(model, ImageClassifier)


def image_classifier_from_transformers(model: nn.Module) -> ImageClassifier:
    """Convert a ``transformers.PerceiverForImageClassificationFourier`` into an :class:`ImageClassifier` (eval
    mode). Ours takes images channels last: ``ours(pixel_values.permute(0, 2, 3, 1))``."""
    return ImageClassifier.from_transformers(model)


def optical_flow_config_from_transformers(model: nn.Module) -> PerceiverIOConfig:
    """Our ``OpticalFlowConfig`` for a ``transformers.PerceiverForOpticalFlow``.

    The mapping is one to one: frame pairs of 3x3 patches are stacked frame-major along channels and projected by
    one Linear (``conv_after_patches``), Fourier features span ``train_size``, and the decoder queries are the
    adapted input. Inputs must be ``train_size`` frames, as in ``transformers`` (it reshapes its output to it).
    """
    return transformers_reader.optical_flow_config(model, OpticalFlow, NUM_FRAMES)


def optical_flow_from_transformers(model: nn.Module) -> OpticalFlow:
    """Convert a ``transformers.PerceiverForOpticalFlow`` into an :class:`OpticalFlow` model (eval mode); both take
    ``[b, 2, 27, h, w]`` patches and give ``[b, h, w, 2]`` flow."""
    return OpticalFlow.from_transformers(model)
