"""Perceiver IO text classifier: ``perceiver.model.text.classifier`` -> here."""

from perceiver_fast.models.core.config import ClassificationDecoderConfig
from perceiver_fast.models.text.classifier.backend import TextClassifier, TextClassifierConfig
from perceiver_fast.models.text.mlm.backend import TextEncoderConfig

__all__ = ["ClassificationDecoderConfig", "TextClassifier", "TextClassifierConfig", "TextEncoderConfig"]
