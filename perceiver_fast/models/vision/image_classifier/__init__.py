"""Perceiver IO image classifier: ``perceiver.model.vision.image_classifier`` -> here."""

from perceiver_fast.models.core.config import ClassificationDecoderConfig
from perceiver_fast.models.vision.image_classifier.backend import (
    ImageClassifier,
    ImageClassifierConfig,
    ImageEncoderConfig,
    ImageInputAdapter,
)

__all__ = [
    "ClassificationDecoderConfig",
    "ImageClassifier",
    "ImageClassifierConfig",
    "ImageEncoderConfig",
    "ImageInputAdapter",
]
