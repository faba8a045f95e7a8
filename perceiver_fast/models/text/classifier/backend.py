"""Perceiver IO text classifier: ``perceiver.model.text.classifier`` -> ``perceiver_fast.models.text.classifier``."""

from __future__ import annotations

import torch
import torch.nn as nn

from perceiver_fast.models.convert import transformers_reader
from perceiver_fast.models.core.config import ClassificationDecoderConfig, PerceiverIOConfig
from perceiver_fast.models.core.io_config import PerceiverIOPretrainedMixin
from perceiver_fast.models.core.perceiver_io import PerceiverIO, classification_decoder
from perceiver_fast.models.core.registry import register_model_type
from perceiver_fast.models.text.mlm.backend import TextEncoder, TextEncoderConfig

TextClassifierConfig = PerceiverIOConfig[TextEncoderConfig, ClassificationDecoderConfig]


@register_model_type("perceiver-io-text-classifier", "PerceiverTextClassifier", "LitTextClassifier")
class TextClassifier(PerceiverIOPretrainedMixin, PerceiverIO):
    """Token ids ``[b, n]`` -> class logits ``[b, num_classes]`` (one learned output query when
    ``num_output_queries == 1``; with more queries the logits keep a query axis, as in perceiver-io)."""

    config_class = TextClassifierConfig
    encoder_config_class = TextEncoderConfig
    decoder_config_class = ClassificationDecoderConfig

    def __init__(self, config: PerceiverIOConfig):
        encoder = TextEncoder.from_io_config(config)
        decoder = classification_decoder(config, num_output_queries=config.decoder.num_output_queries)
        super().__init__(encoder, decoder)
        self.config = config

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits for token ids ``x [b, n]``; ``pad_mask [b, n]`` is True at pads."""
        return self.decoder(self.encoder(x, pad_mask=pad_mask))

    @classmethod
    def from_transformers(cls, model: nn.Module) -> TextClassifier:
        """Convert a ``transformers.PerceiverForSequenceClassification`` (config and weights); see
        :func:`perceiver_fast.models.convert.transformers.text_classifier_from_transformers`."""
        return transformers_reader.text_classifier(model, cls)
